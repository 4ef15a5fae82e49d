"""Hostile input: thousands of malformed messages, each answered with an error, nothing changed, server up."""
import msgpack
import numpy as np
import zmq

from disttrain.paramserver import protocol
from disttrain.paramserver.protocol import decode_reply, encode, request
from disttrain.paramserver.sharding import Layout, ParamSpec

from ps_testing import observer, running_servers, sgd_factory

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
    kind = rng.integers(0, 26)
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
