"""One message from a peer can neither crash nor hang a server (or a worker), and refused messages change nothing:
deep headers, shapes whose product is zero or overflows, epoch jumps, too many frames or bytes, updates that
come out non-finite, and bugs (the last-resort handler)."""
import base64
import json
import re
import signal
import subprocess
import sys
import threading
import time

import msgpack
import numpy as np
import pytest
import zmq

from disttrain.paramserver import protocol
from disttrain.paramserver.protocol import ProtocolError, decode_reply, decode_request, encode, request
from disttrain.paramserver.refusals import MAX_REASON_CHARS, RefusalLog
from disttrain.paramserver.server import ParameterServer, ServerConfig
from disttrain.paramserver.sharding import Layout, ParamSpec
from disttrain.paramserver.snapshot import SnapshotError, load_snapshot, save_snapshot
from disttrain.paramserver.worker import PSClient, PSError, ServerUnavailable

from ps_testing import observer, raw_peer, running_servers, serving, sgd_factory

LAYOUT = Layout([ParamSpec("w", (40,), "<f4"), ParamSpec("b", (6,), "<f4")], 1)
INITIAL = [np.linspace(-1, 1, 40, dtype="<f4"), np.arange(6, dtype="<f4")]
ME = 3
FLT_MAX = np.finfo(np.float32).max


def with_deep_value(header, field, depth):
    """msgpack bytes of `header` whose `field` is a list nested `depth` levels deep (msgpack's own packer stops
    at 511 levels; its unpacker reads up to 1,024)."""
    marker = "@deep-value@"
    packed = msgpack.packb({**header, field: marker})
    return packed.replace(msgpack.packb(marker), b"\x91" * depth + b"\x00")


def grads(value=1.0):
    return [np.full(40, value, "<f4"), np.full(6, value, "<f4")]


def values_of(endpoints):
    watcher = observer(endpoints, LAYOUT)
    try:
        watcher.pull()
        return [t.copy() for t in watcher.targets]
    finally:
        watcher.close()


@pytest.fixture
def server():
    with running_servers(LAYOUT, INITIAL, sgd_factory(momentum=0.9), {"consistency": "async"}) as ((srv,), endpoints):
        yield srv, endpoints[0]


@pytest.mark.parametrize("field", ["worker", "op", "keys", "surprise"])
def test_a_deep_header_is_refused_and_the_server_goes_on(server, field):
    srv, endpoint = server
    with raw_peer(endpoint) as peer:
        assert peer.join(LAYOUT, ME)["op"] == "joined"
        header = request("push", 7, worker=ME, clock=0, keys=[0, 1], dtypes=["<f4", "<f4"], shapes=[[40], [6]])
        frames = [bytes(a.view(np.uint8)) for a in grads()]
        reply = peer.ask([with_deep_value(header, field, 1000), *frames])
        assert reply["op"] == "error" and reply["code"] == "too_deep" and reply["seq"] == 7
        assert peer.request("push", grads(), worker=ME, clock=0, keys=[0, 1])["op"] == "ok"    # still serving
    assert srv.updates == 1 and srv.internal_errors == 0


def joined_reply(seq, worker=ME, server=0):
    return protocol.reply("joined", seq, 1, worker=worker, clock=0, server=server, mode="async", staleness=0)


def connect_to_a_fake_server(answer, timeout):
    """Connect a client to a ROUTER that answers its first join with the frames answer(seq); returns the
    PSError connect() raised (the test fails when it raised none)."""
    ctx = zmq.Context()
    fake = ctx.socket(zmq.ROUTER)
    fake.linger = 0
    port = fake.bind_to_random_port("tcp://127.0.0.1")

    def serve_one():
        if fake.poll(10_000):
            identity, body = fake.recv_multipart()
            fake.send_multipart([identity, *answer(msgpack.unpackb(body)["seq"])])

    thread = threading.Thread(target=serve_one, daemon=True)
    thread.start()
    client = PSClient([f"tcp://127.0.0.1:{port}"], LAYOUT, ME, heartbeat_interval=0, reconnect_timeout=10)
    try:
        with pytest.raises(PSError) as info:
            client.connect(timeout=timeout)
        return info.value
    finally:
        thread.join(timeout=15)
        client.close()
        fake.close()
        ctx.term()


@pytest.mark.parametrize("answer, expected", [
    (lambda seq: [with_deep_value(joined_reply(seq), "mode", 1000)], "nest"),
    (lambda seq: [msgpack.packb(joined_reply(seq))] + [b""] * 10_000, "frames"),
    (lambda seq: [msgpack.packb(joined_reply(seq, worker=ME + 1))], "unexpected answer to join"),
    (lambda seq: [msgpack.packb(joined_reply(seq, server=1))], "unexpected answer to join"),
], ids=["deep", "many-frames", "another-worker", "another-server"])
def test_a_worker_refuses_a_hostile_reply_with_an_error(answer, expected):
    """A hostile (or broken) server answers join with a deep header, too many frames, or for another worker or
    server: the client raises PSError, nothing else."""
    error = connect_to_a_fake_server(answer, timeout=10)
    assert error.code == "bad_reply" and expected in str(error)


def test_a_frame_larger_than_any_message_of_the_layout_is_never_read():
    """ZMQ drops it as it arrives (the socket's MAXMSGSIZE), before buffering it: the join goes unanswered."""
    error = connect_to_a_fake_server(lambda seq: [msgpack.packb(joined_reply(seq)), bytes(4 << 20)], timeout=3)
    assert isinstance(error, ServerUnavailable) and error.code == "unreachable"


def test_error_messages_never_recurse():
    deep = 1
    for _ in range(100_000):
        deep = [deep]
    assert protocol.show(deep).endswith("...") and len(protocol.show(deep)) <= 63
    assert protocol.show({"k": list(range(10 ** 6))}, 20) == "{'k': [0, 1, 2, 3, 4..."


@pytest.mark.parametrize("shape, code", [([2 ** 31, 2 ** 31, 0], "too_large"), ([0, 2 ** 32, 2 ** 32], "too_large"),
                                         ([2 ** 20, 0, 2 ** 20, 2 ** 20], "too_large"), ([0, 10], "bad_shape")])
def test_shapes_whose_product_is_zero_or_overflows_are_refused(server, shape, code):
    srv, endpoint = server
    with raw_peer(endpoint) as peer:
        peer.join(LAYOUT, ME)
        header = request("push", 9, worker=ME, clock=0, keys=[0, 1], dtypes=["<f4", "<f4"], shapes=[shape, [6]])
        reply = peer.raw(header, [b"", bytes(grads()[1].view(np.uint8))])
        assert reply["op"] == "error" and reply["code"] == code, reply
        assert peer.request("push", grads(), worker=ME, clock=0, keys=[0, 1])["op"] == "ok"
    assert srv.updates == 1 and srv.internal_errors == 0


def test_decoding_bounds_the_shape_product_without_numpy_errors():
    header = request("push", 1, worker=0, clock=0, keys=[0], dtypes=["<f8"], shapes=[[2 ** 32, 2 ** 32, 0]])
    with pytest.raises(ProtocolError, match="may hold more than"):
        decode_request([msgpack.packb(header), b""])
    reply = protocol.reply("params", 1, 1, keys=[0], versions=[0], clock=0, dtypes=["<f4"], shapes=[[2 ** 31, 0, 8]])
    with pytest.raises(ProtocolError):
        decode_reply([msgpack.packb(reply), b""])


def test_epoch_jumps_are_refused_before_anything_changes():
    with running_servers(LAYOUT, INITIAL, sgd_factory(), {"max_epoch": 5}) as ((srv,), endpoints), \
            raw_peer(endpoints[0]) as peer:
        peer.join(LAYOUT, ME)
        reply = peer.request("push", grads(), worker=ME, clock=0, keys=[0, 1], epoch=2 ** 53 - 1)
        assert reply["op"] == "error" and reply["code"] == "bad_epoch", reply
        assert srv.epoch == 0 and srv.updates == 0
        reply = peer.request("push", grads(), worker=ME, clock=0, keys=[0, 1], epoch=2)      # two at once
        assert reply["code"] == "bad_epoch"
        assert peer.request("push", grads(), worker=ME, clock=0, keys=[0, 1], epoch=1)["op"] == "ok"
        assert srv.epoch == 1 and srv.updates == 1
        reply = peer.join(LAYOUT, ME + 1, epoch=6)                       # the job has 5 epochs
        assert reply["code"] == "bad_epoch" and ME + 1 not in srv.membership.workers


def test_sigterm_stops_a_server_sent_an_epoch_jump(ps_job, tmp_path):
    """The push that made the server count epochs one by one (for ever, deaf to SIGTERM) is refused at once, and
    SIGTERM ends the server with its final snapshot."""
    spec, job = ps_job("ps.servers=1")
    snapshot = tmp_path / "server-0.snap"
    endpoint_file = tmp_path / "endpoint"
    log = open(tmp_path / "server.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "disttrain.paramserver.cli", "ps-server", str(job), "--index", "0",
                             "--endpoint-file", str(endpoint_file), "--snapshot", str(snapshot), "--insecure"],
                            stdout=log, stderr=log)
    log.close()
    try:
        deadline = time.monotonic() + 60
        while not endpoint_file.exists():
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "server.log").read_text()
            time.sleep(0.05)
        from disttrain.paramserver.job import layout_from_spec

        layout = layout_from_spec(spec)
        with raw_peer(endpoint_file.read_text().strip()) as peer:
            assert peer.join(layout, 0)["op"] == "joined"
            zeros = [np.zeros(p.size, p.dtype) for p in layout.params]
            reply = peer.request("push", zeros, worker=0, clock=0, keys=list(range(len(zeros))), epoch=2 ** 53 - 1)
            assert reply["code"] == "bad_epoch"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert "stopped after 0 updates" in (tmp_path / "server.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_too_many_frames_or_bytes_are_dropped_as_they_are_read(server):
    srv, endpoint = server
    with raw_peer(endpoint) as peer:
        peer.join(LAYOUT, ME)
        head = encode(request("push", 11, worker=ME, clock=0, keys=[0, 1]), grads())
        reply = peer.ask([head[0]] + [b""] * 100_000)
        assert reply["code"] == "too_large" and reply["seq"] == 11 and "at most 4 frames" in reply["message"]
        reply = peer.ask([head[0]] + [b"\0" * (1 << 20)] * 64)          # each frame within MAXMSGSIZE
        assert reply["code"] == "too_large" and "frames and" in reply["message"]
        assert peer.request("push", grads(), worker=ME, clock=0, keys=[0, 1])["op"] == "ok"
    assert srv.updates == 1


def test_receive_keeps_two_frames_of_an_oversized_message():
    ctx = zmq.Context()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    a.bind("inproc://receive")
    b.connect("inproc://receive")
    try:
        a.send_multipart([b"x"] * 1000)
        frames, problem = protocol.receive(b, max_frames=3, max_bytes=100)
        assert len(frames) == 2 and problem.code == "too_large" and "1000 frames" in str(problem)
        a.send_multipart([b"12345", b"6789"])
        frames, problem = protocol.receive(b, max_frames=2, max_bytes=9)
        assert problem is None and [f.bytes for f in frames] == [b"12345", b"6789"]
        a.send_multipart([b"12345", b"67890"])
        assert protocol.receive(b, max_frames=2, max_bytes=9)[1].code == "too_large"
    finally:
        a.close()
        b.close()
        ctx.term()


def test_a_push_or_pull_of_a_key_the_server_does_not_hold_is_refused_by_name(server):
    srv, endpoint = server
    with raw_peer(endpoint) as peer:
        peer.join(LAYOUT, ME)
        for reply in (peer.request("push", grads(), worker=ME, clock=0, keys=[0, 2]),
                      peer.request("pull", worker=ME, clock=0, keys=[2])):
            assert reply["code"] == "bad_key" and reply["message"] == "key 2 is not held by server 0", reply
    assert srv.updates == 0 and srv.internal_errors == 0


def test_a_push_naming_a_key_without_gradient_the_server_does_not_hold_is_refused_by_name(server):
    srv, endpoint = server
    with raw_peer(endpoint) as peer:
        peer.join(LAYOUT, ME)
        reply = peer.request("push", grads()[:1], worker=ME, clock=0, keys=[0], no_grad=[2])
        assert reply["code"] == "bad_key" and reply["message"] == "key 2 is not held by server 0", reply
        reply = peer.request("push", grads()[:1], worker=ME, clock=0, keys=[0], no_grad=[0])
        assert reply["code"] == "bad_key" and "no_grad" in reply["message"], reply
        assert peer.request("stats")["stats"]["clocks"] == {str(ME): 0}
    assert srv.updates == 0 and srv.internal_errors == 0 and srv.versions == {0: 0, 1: 0}
    np.testing.assert_array_equal(values_of([endpoint])[0], INITIAL[0])


def test_a_sync_push_must_name_every_key_with_or_without_gradient():
    with running_servers(LAYOUT, INITIAL, sgd_factory(momentum=0.9), {"consistency": "sync"}) as ((srv,), endpoints):
        with raw_peer(endpoints[0]) as peer:
            peer.join(LAYOUT, ME)
            reply = peer.request("push", grads()[:1], worker=ME, clock=0, keys=[0])
            assert reply["code"] == "bad_key" and "in keys or no_grad" in reply["message"], reply
            assert srv.round == 0 and srv.updates == 0
            assert peer.request("push", grads()[:1], worker=ME, clock=0, keys=[0], no_grad=[1])["op"] == "ok"
            assert srv.round == 1 and srv.versions == {0: 1, 1: 0}
        got = values_of(endpoints)
    np.testing.assert_array_equal(got[1], INITIAL[1])
    assert not srv.optimizer.state.get(srv.shards[1])


def test_an_update_that_turns_a_parameter_non_finite_is_undone(server):
    """Two pushes of FLT_MAX: the first leaves finite values, the second would make them -inf. It is refused,
    the parameters and the momentum are put back bit for bit, and the refusal is counted."""
    srv, endpoint = server
    with raw_peer(endpoint) as peer:
        peer.join(LAYOUT, ME)
        assert peer.request("push", grads(FLT_MAX), worker=ME, clock=0, keys=[0, 1])["op"] == "ok"
        before = values_of([endpoint])
        momentum = [srv.optimizer.state[srv.shards[k]]["momentum_buffer"].copy() for k in srv.keys]
        reply = peer.request("push", grads(FLT_MAX), worker=ME, clock=1, keys=[0, 1])
        assert reply["code"] == "nonfinite_update", reply
        after = values_of([endpoint])
        for got, want in zip(after, before):
            np.testing.assert_array_equal(got, want)
        for k, want in zip(srv.keys, momentum):
            np.testing.assert_array_equal(srv.optimizer.state[srv.shards[k]]["momentum_buffer"], want)
        assert srv.updates == 1 and srv.refused_updates == 1 and srv.versions == {0: 1, 1: 1}
        stats = peer.request("stats")["stats"]
        assert stats["refused_updates"] == 1 and stats["clocks"] == {str(ME): 1}     # the clock did not move
        assert peer.request("push", grads(0.0), worker=ME, clock=1, keys=[0, 1])["op"] == "ok"


def test_a_first_update_that_comes_out_non_finite_leaves_no_optimizer_state(server):
    srv, endpoint = server
    with raw_peer(endpoint) as peer:
        peer.join(LAYOUT, ME)
        with np.errstate(over="ignore"):
            assert peer.request("push", grads(FLT_MAX), worker=ME, clock=0, keys=[0, 1], epoch=1)["op"] == "ok"
            reply = peer.request("push", grads(-FLT_MAX), worker=ME, clock=1, keys=[0, 1])
        assert reply["op"] == "ok"            # momentum 0.9: -FLT_MAX + 0.9 FLT_MAX stays finite
    with running_servers(LAYOUT, INITIAL, sgd_factory(lr=4.0, momentum=0.9)) as ((fresh,), endpoints):
        with raw_peer(endpoints[0]) as peer:
            peer.join(LAYOUT, ME)
            reply = peer.request("push", grads(FLT_MAX), worker=ME, clock=0, keys=[0, 1], epoch=1)
            assert reply["code"] == "nonfinite_update"
            assert len(fresh.optimizer.state) == 0 and fresh.epoch == 0     # the first step's buffers are gone
        for got, want in zip(values_of(endpoints), INITIAL):
            np.testing.assert_array_equal(got, want)


def test_sync_mode_drops_a_round_whose_mean_update_is_non_finite():
    with running_servers(LAYOUT, INITIAL, sgd_factory(lr=4.0, momentum=0.0), {"consistency": "sync"}) \
            as ((srv,), endpoints):
        with raw_peer(endpoints[0]) as peer:
            peer.join(LAYOUT, ME)
            reply = peer.request("push", grads(FLT_MAX), worker=ME, clock=0, keys=[0, 1])
            assert reply["code"] == "nonfinite_update" and srv.round == 1 and srv.updates == 0
            assert peer.request("push", grads(1.0), worker=ME, clock=1, keys=[0, 1])["op"] == "ok"
            assert srv.round == 2 and srv.updates == 1
        got = values_of(endpoints)
    np.testing.assert_array_equal(got[1], INITIAL[1] - 4.0)


def test_a_bug_in_a_handler_is_answered_internal_and_the_server_goes_on(server, monkeypatch):
    srv, endpoint = server
    logged = []
    monkeypatch.setattr(srv, "log", logged.append)
    monkeypatch.setattr(ParameterServer, "_on_stats", lambda *args: {}["missing"])
    with raw_peer(endpoint) as peer:
        peer.join(LAYOUT, ME)
        reply = peer.request("stats")
        assert reply["op"] == "error" and reply["code"] == "internal" and "KeyError" in reply["message"]
        assert peer.request("push", grads(), worker=ME, clock=0, keys=[0, 1])["op"] == "ok"
    assert srv.internal_errors == 1 and srv.updates == 1
    assert any("Traceback" in line and "KeyError" in line for line in logged)


def test_refused_messages_are_logged_with_their_reason_and_peer_at_most_once_an_interval():
    logged = []
    server = ParameterServer(0, LAYOUT, INITIAL, sgd_factory(), ServerConfig(log_every=3600), log=logged.append)
    with serving([server]) as endpoints, raw_peer(endpoints[0]) as peer:
        peer.join(LAYOUT, ME)
        for _ in range(3):
            assert peer.request("pull", worker=ME, clock=0, keys=[2])["code"] == "bad_key"
    refusals = [line for line in logged if "refused a message" in line]
    assert len(refusals) == 1 and server.rejected == 3, logged
    assert re.fullmatch(r"server 0: refused a message from peer [0-9a-f]+: bad_key: key 2 is not held by server 0",
                        refusals[0])


def test_the_refusal_log_counts_what_it_leaves_out_and_shortens_long_reasons():
    now, logged = [0.0], []
    refusals = RefusalLog(logged.append, "server 1", interval=10.0, clock=lambda: now[0])
    for t, reason in ((0.0, "first"), (4.0, "second"), (9.0, "third"), (12.5, "x" * 1000)):
        now[0] = t
        refusals.refused(b"\x01\xab", "bad_header", reason)
    assert logged[0] == "server 1: refused a message from peer 01ab: bad_header: first"
    assert logged[1] == ("server 1: refused a message from peer 01ab: bad_header: " + "x" * MAX_REASON_CHARS
                         + "... (2 more refused since the last one logged, in 12 s)")
    assert len(logged) == 2


def real_snapshot(path):
    """(arrays, meta) of a snapshot the server itself wrote."""
    ParameterServer(0, LAYOUT, INITIAL, sgd_factory(), ServerConfig(snapshot_path=path), log=lambda t: None).snapshot()
    return load_snapshot(path)


def make_server(path):
    return ParameterServer(0, LAYOUT, INITIAL, sgd_factory(), ServerConfig(snapshot_path=path), log=lambda t: None)


def test_a_snapshot_with_a_deep_value_is_a_snapshot_error(tmp_path):
    path = tmp_path / "s.snap"
    arrays, meta = real_snapshot(path)
    save_snapshot(path, arrays, meta)
    tensors, metadata, data = read_safetensors(path)
    deep = msgpack.packb({**meta, "fingerprint": "@deep-value@"}).replace(msgpack.packb("@deep-value@"),
                                                                          b"\x91" * 1000 + b"\x00")
    write_safetensors(path, tensors, {**metadata, "meta": base64.b64encode(deep).decode()}, data)
    with pytest.raises(SnapshotError, match="nest"):
        make_server(path)


def test_a_snapshot_with_unreadable_counters_is_a_snapshot_error(tmp_path):
    path = tmp_path / "s.snap"
    arrays, meta = real_snapshot(path)
    save_snapshot(path, arrays, {**meta, "versions": ["a", [1]]})
    with pytest.raises(SnapshotError, match="counters"):
        make_server(path)


def read_safetensors(path):
    """(tensor table, metadata, data bytes) of a safetensors file, to rewrite it damaged."""
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + size])
    metadata = header.pop("__metadata__", {})
    return header, metadata, raw[8 + size:]


def write_safetensors(path, tensors, metadata, data):
    header = json.dumps({**tensors, "__metadata__": metadata}).encode()
    path.write_bytes(len(header).to_bytes(8, "little") + header + data)


def test_a_snapshot_with_an_overflowing_shape_is_refused(tmp_path):
    path = tmp_path / "s.snap"
    arrays, meta = real_snapshot(path)
    save_snapshot(path, arrays, meta)
    tensors, metadata, data = read_safetensors(path)
    name = next(iter(tensors))
    tensors[name] = {**tensors[name], "shape": [2 ** 32, 2 ** 32, 2]}     # 2^65 elements: past any size type
    write_safetensors(path, tensors, metadata, data)
    with pytest.raises(SnapshotError, match="not a readable snapshot"):
        make_server(path)


