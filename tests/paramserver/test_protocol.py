"""Protocol: encode/decode round trips (property tests) and strict rejection of everything else."""
import msgpack
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from disttrain.paramserver import protocol
from disttrain.paramserver.protocol import ProtocolError, decode_reply, decode_request, encode, request

settings.register_profile("ps", max_examples=150, deadline=None)
settings.load_profile("ps")

dtypes = st.sampled_from(["<f4", "<f8"])
ints = st.integers(0, protocol.MAX_CLOCK)
ids = st.integers(0, protocol.MAX_WORKER_ID)


@st.composite
def arrays(draw, max_len=40):
    dtype = draw(dtypes)
    n = draw(st.integers(0, max_len))
    values = draw(st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=n, max_size=n))
    return np.array(values, dtype=dtype)


@given(seq=st.integers(0, protocol.MAX_SEQ), worker=ids, clock=ints, epoch=ints, pull=st.booleans(),
       data=st.lists(arrays(), max_size=6))
def test_push_round_trip(seq, worker, clock, epoch, pull, data):
    keys = list(range(100, 100 + len(data)))
    frames = encode(request("push", seq, worker=worker, clock=clock, keys=keys, epoch=epoch, pull=pull), data)
    header, out = decode_request([bytes(f) for f in frames])
    assert header == {"v": 1, "op": "push", "seq": seq, "worker": worker, "clock": clock, "keys": keys,
                      "epoch": epoch, "pull": pull, "dtypes": [a.dtype.str for a in data],
                      "shapes": [list(a.shape) for a in data]}
    for a, b in zip(data, out):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8))     # bit-exact, NaN payloads too


@given(sent=st.lists(arrays(), max_size=4), no_grad=st.lists(st.integers(0, 99), unique=True, max_size=6))
def test_push_naming_keys_without_gradient_round_trips(sent, no_grad):
    keys = list(range(100, 100 + len(sent)))
    header, out = decode_request(encode(request("push", 1, worker=0, clock=0, keys=keys, no_grad=no_grad), sent))
    assert header["keys"] == keys and header["no_grad"] == no_grad and len(out) == len(sent)


@given(seq=st.integers(0, protocol.MAX_SEQ), worker=ids, clock=ints,
       keys=st.none() | st.lists(st.integers(0, protocol.MAX_KEYS - 1), unique=True, max_size=20))
def test_pull_and_control_round_trip(seq, worker, clock, keys):
    fields = {} if keys is None else {"keys": keys}
    for header in (request("pull", seq, worker=worker, clock=clock, **fields),
                   request("heartbeat", seq, worker=worker), request("leave", seq, worker=worker),
                   request("stats", seq),
                   request("join", seq, worker=worker, clock=clock, fingerprint="ab" * 32, observer=True)):
        decoded, arrays_ = decode_request(encode(header))
        assert decoded == header and arrays_ is None


@given(seq=st.integers(0, protocol.MAX_SEQ), inc=st.integers(0, protocol.MAX_SEQ), clock=ints,
       data=st.lists(arrays(), max_size=4), lr=st.floats(1e-6, 10))
def test_params_reply_round_trip(seq, inc, clock, data, lr):
    keys = list(range(len(data)))
    frames = encode(protocol.reply("params", seq, inc, keys=keys, versions=[clock] * len(keys), clock=clock, lr=lr),
                    data)
    header, out = decode_reply(frames)
    assert header["keys"] == keys and header["lr"] == lr and header["incarnation"] == inc
    for a, b in zip(data, out):
        np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8))


@given(st.lists(st.binary(max_size=200), min_size=0, max_size=4))
def test_arbitrary_bytes_only_ever_raise_protocol_error(frames):
    with pytest.raises(ProtocolError):
        decode_request(frames)


values = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 63, 2 ** 64 - 1), st.floats(), st.text(max_size=8),
                   st.lists(st.integers(-9, 9), max_size=3))


@given(st.dictionaries(st.sampled_from(["v", "op", "seq", "worker", "clock", "keys", "x"]) | st.text(max_size=8),
                       values, max_size=8))
def test_arbitrary_maps_are_rejected_or_fully_valid(header):
    try:
        decoded, _ = decode_request([msgpack.packb(header)])
    except ProtocolError as exc:
        assert exc.code
    else:   # the rare random map that is a valid request decodes to exactly itself
        assert decoded == header


def good_push():
    return request("push", 1, worker=0, clock=0, keys=[0]), [np.zeros(4, dtype="<f4")]


@pytest.mark.parametrize("change, code", [
    (lambda h: h.update(v=2), "bad_version"),
    (lambda h: h.update(v=True), "bad_version"),
    (lambda h: h.update(op="delete"), "unknown_op"),
    (lambda h: h.update(surprise=1), "unknown_field"),
    (lambda h: h.pop("seq"), "missing_field"),
    (lambda h: h.pop("clock"), "missing_field"),
    (lambda h: h.update(worker=-1), "bad_field"),
    (lambda h: h.update(worker=True), "bad_field"),
    (lambda h: h.update(worker=1.0), "bad_field"),
    (lambda h: h.update(worker="0"), "bad_field"),
    (lambda h: h.update(clock=2 ** 60), "bad_field"),
    (lambda h: h.update(pull=1), "bad_field"),
    (lambda h: h.update(keys=[0, 0], dtypes=["<f4"] * 2, shapes=[[4]] * 2), "malformed"),
    (lambda h: h.update(dtypes=["<i8"]), "bad_dtype"),
    (lambda h: h.update(dtypes=["object"]), "bad_dtype"),
    (lambda h: h.update(shapes=[[5]]), "bad_shape"),
    (lambda h: h.update(shapes=[[2 ** 31, 2 ** 31]]), "too_large"),
    (lambda h: h.update(shapes=[[-4]]), "bad_shape"),
    (lambda h: h.update(shapes=[[1] * 9]), "bad_shape"),
    (lambda h: h.update(keys=[protocol.MAX_KEYS]), "bad_field"),
    (lambda h: h.update(no_grad=3), "bad_field"),
    (lambda h: h.update(no_grad=[True]), "bad_field"),
    (lambda h: h.update(no_grad=[-1]), "bad_field"),
    (lambda h: h.update(no_grad=[1.0]), "bad_field"),
    (lambda h: h.update(no_grad=[protocol.MAX_KEYS]), "bad_field"),
    (lambda h: h.update(no_grad=list(range(1, protocol.MAX_KEYS + 2))), "malformed"),   # msgpack's list bound
    (lambda h: h.update(no_grad=[1, 1]), "bad_key"),
    (lambda h: h.update(no_grad=[0]), "bad_key"),                                    # also in keys
])
def test_each_bad_field_is_named(change, code):
    header, arrays_ = good_push()
    frames = encode(header, arrays_)
    header = msgpack.unpackb(frames[0])
    change(header)
    with pytest.raises(ProtocolError) as info:
        decode_request([msgpack.packb(header), *frames[1:]])
    assert info.value.code == code, str(info.value)


def test_frame_count_and_sizes_must_match_the_header():
    header, arrays_ = good_push()
    frames = encode(header, arrays_)
    for bad in ([frames[0]], [*frames, b"x"], [frames[0], b"\0" * 15]):
        with pytest.raises(ProtocolError):
            decode_request(bad)
    with pytest.raises(ProtocolError, match="extra frame"):
        decode_request([encode(request("stats", 1))[0], b"1234"])


def test_headers_refuse_binary_ext_and_oversized_data():
    for payload in ({"v": 1, "op": "stats", "seq": 1, "x": b"bin"},
                    {"v": 1, "op": "stats", "seq": 1, 1: 2}):
        with pytest.raises(ProtocolError):
            decode_request([msgpack.packb(payload, use_bin_type=True)])
    ext = msgpack.packb(msgpack.ExtType(5, b"abc"))
    with pytest.raises(ProtocolError, match="msgpack"):
        decode_request([ext])
    with pytest.raises(ProtocolError, match="exceeds"):
        decode_request([b"\x80" * (protocol.MAX_HEADER_BYTES + 1)])


def test_encode_refuses_what_it_cannot_send():
    with pytest.raises(ValueError, match="dtype"):
        encode(request("push", 1, worker=0, clock=0, keys=[0]), [np.zeros(3, dtype=np.int64)])
    with pytest.raises(ValueError, match="contiguous"):
        encode(request("push", 1, worker=0, clock=0, keys=[0]), [np.zeros((4, 4))[:, 0]])


def test_decoded_arrays_are_views_of_the_frames():
    data = np.arange(8, dtype="<f8")
    frames = [bytes(f) for f in encode(request("push", 1, worker=0, clock=0, keys=[3]), [data])]
    _, (out,) = decode_request(frames)
    assert not out.flags.writeable and not out.flags.owndata
