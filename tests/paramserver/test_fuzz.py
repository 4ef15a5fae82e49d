"""Hostile input: thousands of malformed messages, each answered with an error, nothing changed, server up; and
property tests per class of hostile input (deep nesting, dimension products, frame counts and sizes, clock and
epoch jumps, identity spoofing)."""
import sys
from contextlib import ExitStack

import msgpack
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, example, given, settings, strategies as st

from disttrain.paramserver import protocol
from disttrain.paramserver.auth import ClientSecurity, ServerSecurity, generate_keys
from disttrain.paramserver.protocol import ProtocolError, decode_reply, decode_request, encode, request
from disttrain.paramserver.sharding import Layout, ParamSpec

from ps_testing import RawPeer, observer, running_servers, sgd_factory

LAYOUT = Layout([ParamSpec("w", (40,), "<f4"), ParamSpec("b", (6,), "<f4")], 1)
INITIAL = [np.linspace(-1, 1, 40, dtype="<f4"), np.arange(6, dtype="<f4")]
ME = 7                 # the fuzzer's worker id (joined, so that deep checks are reached)
N_MESSAGES = 3000


def good_push(seq, worker=ME, clock=0):
    grads = [np.ones(40, "<f4"), np.ones(6, "<f4")]
    return request("push", seq, worker=worker, clock=clock, keys=[0, 1]), grads


def packed(header, arrays=None):
    return [bytes(f) for f in encode(header, arrays)]


def raw_push(header, frames):
    return [msgpack.packb(header)] + frames


def hostile(rng, seq):
    """One message that must be refused, and whether its seq is readable."""
    kind = rng.integers(0, 29)
    h, g = good_push(seq)
    frames = [bytes(a.view(np.uint8)) for a in g]
    full = {**h, "dtypes": ["<f4", "<f4"], "shapes": [[40], [6]]}
    if kind == 0:
        return [rng.bytes(int(rng.integers(0, 100))) for _ in range(rng.integers(1, 4))], False
    if kind == 1:
        return [msgpack.packb([1, "push", seq])], False
    if kind == 2:
        junk = {str(rng.integers(0, 1e6)): rng.bytes(3).hex() for _ in range(rng.integers(0, 6))}
        return [msgpack.packb(junk)], False
    mutations = {
        3: lambda: raw_push({**full, "keys": [0, 5]}, frames),                                     # key not held
        4: lambda: raw_push({**full, "keys": [0, 70000]}, frames),                                 # key out of range
        5: lambda: raw_push({**full, "dtypes": ["<f8", "<f4"], "shapes": [[20], [6]]}, frames),   # wrong dtype
        6: lambda: raw_push({**full, "shapes": [[41], [6]]}, [frames[0] + b"\0" * 4, frames[1]]),  # wrong shape
        7: lambda: raw_push({**full, "shapes": [[40], [5]]}, frames),                              # size mismatch
        8: lambda: raw_push({**full, "shapes": [[2 ** 31, 2 ** 31], [6]]}, frames),                # huge declared
        9: lambda: packed(h, [np.full(40, np.nan, "<f4"), g[1]]),                                  # NaN gradient
        10: lambda: packed(h, [g[0], np.array([1, 2, 3, np.inf, 5, 6], "<f4")]),                  # inf gradient
        11: lambda: packed({**h, "clock": 5}, g),                                                  # wrong clock
        12: lambda: raw_push({**full, "keys": [0, 0]}, frames),                                    # duplicate key
        13: lambda: raw_push(full, frames[:1]),                                                    # missing frame
        14: lambda: raw_push(full, frames + [b"extra"]),                                           # extra frame
        15: lambda: packed({**h, "worker": 8}, g),                                                 # not joined
        16: lambda: raw_push({**full, "surprise": True}, frames),                                  # unknown field
        17: lambda: raw_push({**full, "clock": "0"}, frames),                                      # wrong types
        18: lambda: raw_push({**full, "worker": 7.0}, frames),
        19: lambda: raw_push({**full, "keys": "01"}, frames),
        20: lambda: raw_push({**full, "epoch": -1}, frames),
        21: lambda: raw_push({**full, "v": 0}, frames),
        22: lambda: packed(request("pull", seq, worker=ME, clock=0, keys=[0, 9])),              # pull: bad key
        23: lambda: packed(request("pull", seq, worker=ME, clock=3)),                            # pull: bad clock
        24: lambda: packed(request("join", seq, worker=ME + 1, clock=0, fingerprint="0" * 64)),  # other layout
        25: lambda: packed(request("leave", seq, worker=9)),                                     # never joined
        26: lambda: raw_push({**full, "no_grad": [5]}, frames),                                    # no_grad: not held
        27: lambda: raw_push({**full, "no_grad": [1]}, frames),                                    # ... and in keys
        28: lambda: raw_push({**full, "no_grad": [[1]]}, frames),                                  # ... wrong type
    }
    return mutations[int(kind)](), True


def test_thousands_of_hostile_messages_change_nothing():
    with running_servers(LAYOUT, INITIAL, sgd_factory(), {"consistency": "async"}) as ((server,), endpoints):
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.connect(endpoints[0])
        try:
            sock.send_multipart(packed(request("join", 1, worker=ME, clock=0, fingerprint=LAYOUT.fingerprint)))
            assert sock.poll(5000) and decode_reply(sock.recv_multipart())[0]["op"] == "joined"
            rng = np.random.default_rng(0)
            codes = {}
            seq = 100
            for _ in range(N_MESSAGES // 250):
                sent = []
                for _ in range(250):
                    seq += 1
                    frames, readable = hostile(rng, seq)
                    sock.send_multipart(frames)
                    sent.append(seq if readable else None)
                for expected in sent:
                    assert sock.poll(5000), "the server stopped answering"
                    header, _ = decode_reply(sock.recv_multipart())
                    assert header["op"] == "error", header
                    if expected is not None:
                        assert header["seq"] == expected
                    codes[header["code"]] = codes.get(header["code"], 0) + 1
            assert server.updates == 0 and server.rejected == N_MESSAGES
            assert {"malformed", "bad_key", "bad_dtype", "bad_shape", "too_large", "nonfinite", "bad_clock",
                    "not_joined", "unknown_field", "bad_field", "bad_version", "layout_mismatch"} <= set(codes)

            # a second connection may not act as worker 7
            other = ctx.socket(zmq.DEALER)
            other.linger = 0
            other.connect(endpoints[0])
            h, g = good_push(5)
            other.send_multipart(packed(h, g))
            assert other.poll(5000) and decode_reply(other.recv_multipart())[0]["code"] == "wrong_connection"
            other.close()

            watcher = observer(endpoints, LAYOUT)
            watcher.pull()
            for got, want in zip(watcher.targets, INITIAL):
                np.testing.assert_array_equal(got, want)          # bit for bit what the server started with
            # still serving: a valid push from the fuzzer's connection is applied
            h, g = good_push(seq + 1)
            sock.send_multipart(packed(h, g))
            assert sock.poll(5000) and decode_reply(sock.recv_multipart())[0]["op"] == "ok"
            assert server.updates == 1
            watcher.pull()
            np.testing.assert_allclose(watcher.targets[1], INITIAL[1] - 0.1)
            watcher.close()
        finally:
            sock.close()
            ctx.term()


def test_oversized_frame_drops_only_that_connection():
    with running_servers(LAYOUT, INITIAL, sgd_factory(), {"consistency": "async"}) as ((server,), endpoints):
        ctx = zmq.Context()
        bad = ctx.socket(zmq.DEALER)
        bad.linger = 0
        bad.connect(endpoints[0])
        header = request("push", 1, worker=ME, clock=0, keys=[0], dtypes=["<f4"], shapes=[[4 << 20]])
        bad.send_multipart([msgpack.packb(header), b"\0" * (16 << 20)])     # above the server's MAXMSGSIZE
        assert not bad.poll(1000)                                          # dropped by ZMQ, never reaches the code
        bad.close()
        ctx.term()
        watcher = observer(endpoints, LAYOUT)
        watcher.pull()
        np.testing.assert_array_equal(watcher.targets[0], INITIAL[0])
        watcher.close()
        assert server.updates == 0


def test_nonfinite_gradients_are_accepted_when_the_job_allows_them():
    with running_servers(LAYOUT, INITIAL, sgd_factory(momentum=0.0),
                         {"reject_nonfinite": False}) as ((server,), endpoints):
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.connect(endpoints[0])
        sock.send_multipart(packed(request("join", 1, worker=ME, clock=0, fingerprint=LAYOUT.fingerprint)))
        assert sock.poll(5000) and decode_reply(sock.recv_multipart())[0]["op"] == "joined"
        h, g = good_push(2)
        g[1][2] = np.nan
        sock.send_multipart(packed(h, g))
        assert sock.poll(5000) and decode_reply(sock.recv_multipart())[0]["op"] == "ok"
        assert server.updates == 1 and np.isnan(server.shards[1].data[2])
        sock.close()
        ctx.term()


def test_protocol_limits_are_sane():
    assert protocol.MAX_HEADER_BYTES >= 1 << 16 and set(protocol.DTYPES) == {"<f4", "<f8"}


# ------------------------------------------------------------------------------------------------------------
# Property tests, one per class of hostile input: whatever hypothesis draws, the answer is a ProtocolError (or
# an error reply) or exactly what the rules allow, and the server keeps serving.

LIVE = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                       HealthCheck.too_slow])
OPS = ["join", "leave", "heartbeat", "pull", "push", "stats"]
FIELDS = ["worker", "clock", "keys", "epoch", "shapes", "dtypes", "fingerprint", "op", "v", "seq", "x"]


def deep_header(op, field, depth):
    header = {"v": 1, "op": op, "seq": 1, "worker": 0, "clock": 0}
    marker = "@deep@"
    return msgpack.packb({**header, field: marker}).replace(msgpack.packb(marker), b"\x91" * depth + b"\xc0")


@settings(max_examples=200, deadline=None)
@given(op=st.sampled_from(OPS), field=st.sampled_from(FIELDS), depth=st.integers(1, 1022) | st.integers(990, 1022))
@example(op="push", field="worker", depth=1022)                     # as deep as msgpack reads
def test_fuzz_deep_nesting_only_ever_raises_protocol_error(op, field, depth):
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(1000)              # Python's default: hypothesis raises it while a test runs
    try:
        for decode in (decode_request, decode_reply):
            with pytest.raises(ProtocolError) as info:
                decode([deep_header(op, field, depth)])
            assert len(str(info.value)) < 600
    finally:
        sys.setrecursionlimit(limit)


dims = st.one_of(st.just(0), st.integers(1, 8), st.integers(2 ** 15, 2 ** 33), st.sampled_from([2 ** 31, 2 ** 32]))


@settings(max_examples=300, deadline=None)
@given(shape=st.lists(dims, max_size=9), dtype=st.sampled_from(["<f4", "<f8"]), extra=st.integers(-8, 8))
def test_fuzz_dimension_products_zero_and_overflowing(shape, dtype, extra):
    itemsize = np.dtype(dtype).itemsize
    true_bytes = int(np.prod([float(n) for n in shape])) * itemsize if shape else itemsize
    length = max(0, true_bytes + extra) if true_bytes <= 4096 else int(abs(extra))
    header = request("push", 1, worker=0, clock=0, keys=[0], dtypes=[dtype], shapes=[shape])
    try:
        _, (array,) = decode_request([msgpack.packb(header), b"\0" * length])
    except ProtocolError as exc:
        assert exc.code in ("bad_shape", "too_large")
    else:
        assert list(array.shape) == shape and array.nbytes == length == true_bytes


@pytest.fixture(scope="module")
def pair():
    ctx = zmq.Context()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    a.bind("inproc://fuzz-frames")
    b.connect("inproc://fuzz-frames")
    yield a, b
    a.close()
    b.close()
    ctx.term()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sizes=st.lists(st.integers(0, 300), min_size=1, max_size=60), max_frames=st.integers(2, 40),
       max_bytes=st.integers(0, 6000))
def test_fuzz_frame_counts_and_total_sizes(pair, sizes, max_frames, max_bytes):
    a, b = pair
    a.send_multipart([b"x" * n for n in sizes])
    frames, problem = protocol.receive(b, max_frames, max_bytes)
    too_many = len(sizes) > max_frames or sum(sizes) > max_bytes
    assert (problem is not None) == too_many
    assert [len(f) for f in frames] == (sizes[:2] if too_many else sizes)
    assert not b.poll(0)                                             # the whole message was consumed


@pytest.fixture(scope="module")
def live():
    with running_servers(LAYOUT, INITIAL, sgd_factory(momentum=0.0),
                         {"consistency": "async", "max_epoch": 5, "heartbeat_timeout": 600.0}) as ((server,), ends):
        yield server, ends[0]


@LIVE
@given(count=st.integers(0, 3000), size=st.integers(0, 2048))
def test_fuzz_live_frame_counts_are_refused_and_the_server_serves(live, count, size):
    server, endpoint = live
    peer = RawPeer(endpoint)
    try:
        before = server.updates
        reply = peer.ask([msgpack.packb({"v": 1, "op": "push", "seq": 3, "worker": 0, "clock": 0, "keys": [0, 1],
                                         "dtypes": ["<f4", "<f4"], "shapes": [[40], [6]]})] + [b"\0" * size] * count)
        assert reply["op"] == "error" and server.updates == before
        if count > 2 or (count + 2) * size > server._max_bytes:
            assert reply["code"] == "too_large"
        assert peer.request("stats")["code"] == "forbidden"          # answered: still serving
    finally:
        peer.close()


jumps = st.one_of(st.integers(0, 3), st.integers(0, 2 ** 53 - 1), st.just(2 ** 53 - 1))


@LIVE
@given(join_epoch=jumps, pushes=st.lists(st.tuples(st.integers(-1, 2) | jumps, jumps), max_size=8),
       worker=st.integers(100, 60000))
def test_fuzz_clock_and_epoch_jumps_follow_the_rules(live, join_epoch, pushes, worker):
    server, endpoint = live
    peer = RawPeer(endpoint)
    try:
        reply = peer.join(LAYOUT, worker, epoch=join_epoch)
        if join_epoch > 5:
            assert reply["code"] == "bad_epoch"
            return
        clock, epoch = reply["clock"], join_epoch
        for delta, pushed_epoch in pushes:
            sent = clock + delta if delta < 4 else delta
            if not 0 <= sent <= protocol.MAX_CLOCK:
                continue
            updates = server.updates
            reply = peer.request("push", [np.zeros(40, "<f4"), np.zeros(6, "<f4")], worker=worker, clock=sent,
                                 keys=[0, 1], epoch=pushed_epoch)
            if sent not in (clock, clock - 1):
                assert reply["code"] == "bad_clock" and server.updates == updates
            elif pushed_epoch > epoch + 1:
                assert reply["code"] == "bad_epoch" and server.updates == updates
            elif sent == clock:
                assert reply["op"] == "ok" and server.updates == updates + 1
                clock, epoch = clock + 1, max(epoch, pushed_epoch)
            assert server.epoch <= 5
        peer.request("leave", worker=worker)
    finally:
        peer.close()


@pytest.fixture(scope="module")
def curve_keys(tmp_path_factory):
    return generate_keys(tmp_path_factory.mktemp("fuzz-keys"), ["worker-0", "worker-1", "admin", "monitor"])


KEY_NAMES = ["worker-0", "worker-1", "admin", "monitor"]
action = st.tuples(st.integers(0, 3),                              # the connection (each has one key)
                   st.sampled_from(["join", "observe", "heartbeat", "stats", "push", "leave"]),
                   st.integers(0, 2))                              # the worker id it names


class IdentityModel:
    """What the rules allow: a key joins only as its worker (others only observe); heartbeats, pushes and leaves
    only on the connection that joined (an observer's heartbeat is answered, and changes nothing); stats on a
    joined connection or for the admin key."""

    def __init__(self, names):
        self.names, self.worker_on, self.observer_on, self.clock, self.pushes = names, {}, {}, {}, {}

    def allowed(self, conn, op, worker):
        name = self.names[conn]
        if name is None:
            own = True
        else:
            own = name == f"worker-{worker}"
        if op == "join":
            return own and name not in ("admin", "monitor")
        if op == "observe":
            return (own or name in ("admin", "monitor")) and worker not in self.worker_on
        if op == "stats":
            return name == "admin" or conn in self.worker_on.values() or conn in self.observer_on.values()
        if op in ("leave", "heartbeat"):
            return self.worker_on.get(worker) == conn or self.observer_on.get(worker) == conn
        return self.worker_on.get(worker) == conn                  # push

    def apply(self, conn, op, worker, reply):
        if op == "join":
            self.observer_on.pop(worker, None)
            self.worker_on[worker] = conn
            self.clock[worker] = reply["clock"]                    # the server sets it (the slowest live clock)
            self.pushes.setdefault(worker, 0)
        elif op == "observe":
            self.observer_on[worker] = conn
        elif op == "leave":
            self.worker_on.pop(worker, None)
            self.observer_on.pop(worker, None)
        elif op == "push":
            self.clock[worker] += 1
            self.pushes[worker] += 1


def act(peer, model, op, worker):
    if op in ("join", "observe"):
        return peer.join(LAYOUT, worker, **({"observer": True} if op == "observe" else {}))
    if op == "push":
        return peer.request("push", [np.zeros(40, "<f4"), np.zeros(6, "<f4")], worker=worker,
                            clock=model.clock.get(worker, 0), keys=[0, 1])
    fields = {} if op == "stats" else {"worker": worker}
    return peer.request(op, **fields)


@pytest.mark.parametrize("curve", [True, False], ids=["curve", "insecure"])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(actions=st.lists(action, min_size=1, max_size=14))
def test_fuzz_identity_spoofing(curve_keys, curve, actions):
    names = KEY_NAMES if curve else [None] * 4
    security = [ServerSecurity(curve_keys)] if curve else None
    with running_servers(LAYOUT, INITIAL, sgd_factory(), {"heartbeat_timeout": 600.0}, securities=security) \
            as ((server,), endpoints), ExitStack() as stack:
        peers = [RawPeer(endpoints[0], ClientSecurity.from_dir(curve_keys, n) if curve else None) for n in names]
        for peer in peers:
            stack.callback(peer.close)
        model = IdentityModel(names)
        for conn, op, worker in actions:
            allowed = model.allowed(conn, op, worker)
            reply = act(peers[conn], model, op, worker)
            assert (reply["op"] != "error") == allowed, (conn, names[conn], op, worker, reply)
            if allowed:
                model.apply(conn, op, worker, reply)
        assert server.updates == sum(model.pushes.values())
