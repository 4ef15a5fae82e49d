"""Parts larger than ZERO_COPY_BYTES: the server hands their memory to ZMQ without copying, so an update that
lands while such a reply is still being sent must first give the part fresh memory (copy-on-write). And the
snapshot of such a server resumes only on the same setup.

To keep replies in flight deterministically, a reader asks for several multi-MB reads and does not take them:
with one message of receive queue and a tiny kernel receive buffer it stops reading, TCP flow control stalls
the server's sends, and the replies wait in ZMQ's hands while a worker's push is applied.
"""
import math
from pathlib import Path

import numpy as np
import pytest
import zmq

from disttrain.paramserver.protocol import decode_reply, encode, request
from disttrain.paramserver.server import ZERO_COPY_BYTES, ParameterServer, ServerConfig
from disttrain.paramserver.sharding import Layout, ParamSpec
from disttrain.paramserver.snapshot import SnapshotError
from disttrain.paramserver.worker import PSClient

from ps_testing import observer, running_servers, sgd_factory, wait_for

BIG = 1 << 20                                    # elements: a 4 MiB float32 part
LAYOUT = Layout([ParamSpec("w", (BIG,), "<f4"), ParamSpec("b", (10,), "<f4")], 1)
INITIAL = [np.arange(BIG, dtype="<f4") / BIG, np.zeros(10, "<f4")]
READER, WRITER = 50, 1


def stalled_reads():
    """Reads enough to stall the server's sends: more bytes than the kernel's largest TCP send buffer (twice
    over), plus a few for ZMQ's own queues."""
    tcp_wmem = Path("/proc/sys/net/ipv4/tcp_wmem")
    send_buffer = int(tcp_wmem.read_text().split()[2]) if tcp_wmem.exists() else 4 << 20
    return 3 + math.ceil(2 * send_buffer / (BIG * 4))


def describe(values, old, new):
    """'old', 'new', or how a torn mix of the two looks."""
    if np.array_equal(values, old):
        return "old"
    if np.array_equal(values, new):
        return "new"
    return (f"torn: {np.mean(values == old):.1%} old, {np.mean(values == new):.1%} new, "
            f"first change at element {int(np.argmax(values != old))}")


def test_reads_in_flight_keep_the_values_they_were_answered_with():
    assert INITIAL[0].nbytes >= 16 * ZERO_COPY_BYTES          # sent zero-copy
    reads = stalled_reads()
    grads = [np.ones(BIG, "<f4"), np.ones(10, "<f4")]
    with running_servers(LAYOUT, INITIAL, sgd_factory(lr=1.0, momentum=0.0)) as ((server,), endpoints):
        ctx = zmq.Context()
        reader = ctx.socket(zmq.DEALER)
        reader.rcvhwm = 1                                      # set before connecting: they apply to new pipes
        reader.setsockopt(zmq.RCVBUF, 4096)
        reader.linger = 0
        reader.connect(endpoints[0])
        writer = PSClient(endpoints, LAYOUT, WRITER, heartbeat_interval=0, server_timeout=60.0)
        try:
            reader.send_multipart(encode(request("join", 1, worker=READER, clock=0,
                                                 fingerprint=LAYOUT.fingerprint, observer=True)))
            assert reader.poll(10_000) and decode_reply(reader.recv_multipart())[0]["op"] == "joined"
            writer.connect([np.zeros(p.size, p.dtype) for p in LAYOUT.params], timeout=30)

            before = server.requests
            for seq in range(2, 2 + reads):
                reader.send_multipart(encode(request("pull", seq, worker=READER, clock=0)))
            wait_for(lambda: server.requests >= before + reads, "the server to answer the reads")
            writer.push(grads, pull=True)                          # the update lands; the reads are still sent
            old, new = INITIAL[0], INITIAL[0] - np.float32(1.0)
            np.testing.assert_array_equal(writer.targets[0], new)

            seen = []
            for _ in range(reads):
                assert reader.poll(30_000), "a read was never answered"
                header, arrays = decode_reply(reader.recv_multipart())
                assert header["versions"][0] == 0                  # answered before the update ...
                seen.append(describe(arrays[0], old, new))
            assert seen == ["old"] * reads, seen                   # ... so they carry the values before it
            assert server.copies_on_write >= 1, "no read was in flight when the update landed: send more"
        finally:
            writer.close()
            reader.close()
            ctx.term()


def test_reads_during_many_updates_are_each_one_version():
    """A worker pushes while an observer keeps reading: every read is exactly the values of the version it
    names (plain SGD of a gradient of ones: version v is the start minus v), never a mix of two."""
    grads = [np.ones(BIG, "<f4"), np.ones(10, "<f4")]
    with running_servers(LAYOUT, INITIAL, sgd_factory(lr=1.0, momentum=0.0)) as ((server,), endpoints):
        watcher = observer(endpoints, LAYOUT)
        ctx = zmq.Context()
        writer = ctx.socket(zmq.DEALER)
        writer.linger = 0
        writer.connect(endpoints[0])
        try:
            writer.send_multipart(encode(request("join", 1, worker=WRITER, clock=0, fingerprint=LAYOUT.fingerprint)))
            assert writer.poll(10_000) and decode_reply(writer.recv_multipart())[0]["op"] == "joined"
            for clock in range(8):                                  # queued at once: they land between reads
                writer.send_multipart(encode(request("push", 2 + clock, worker=WRITER, clock=clock, keys=[0, 1]),
                                             grads))
            last = False
            while not last:
                last = server.updates == 8                          # one more read after the last update
                watcher.pull()
                got = watcher.targets[0]
                version = int(round(float(INITIAL[0][0] - got[0])))
                want = INITIAL[0] - np.float32(version)
                assert np.array_equal(got, want), describe(got, want, want - np.float32(1.0))
            assert version == 8
            for _ in range(8):
                assert writer.poll(30_000) and decode_reply(writer.recv_multipart())[0]["op"] == "ok"
        finally:
            writer.close()
            ctx.term()
            watcher.close()


# ------------------------------------------------------------------------------------------ snapshots

def run_and_snapshot(path, layout, initial, pushes):
    """The one server of `layout` snapshotting to `path`: apply `pushes` from one worker, then stop (which
    snapshots)."""
    with running_servers(layout, initial, sgd_factory(lr=0.5), snapshot_paths=[path]) as (_, endpoints):
        targets = [np.zeros(p.size, p.dtype) for p in layout.params]
        client = PSClient(endpoints, layout, WRITER, heartbeat_interval=0, server_timeout=60.0)
        try:
            client.connect(targets, timeout=30)
            for grads in pushes:
                client.push(grads, pull=True)
        finally:
            client.close()
    return targets


def gradients(layout, n):
    rng = np.random.default_rng(4)
    return [[rng.standard_normal(p.size).astype(p.dtype) for p in layout.params] for _ in range(n)]


def test_snapshot_of_large_parts_resumes_on_the_same_setup(tmp_path):
    path = tmp_path / "server-0.snap"
    at_stop = run_and_snapshot(path, LAYOUT, INITIAL, gradients(LAYOUT, 3))
    with running_servers(LAYOUT, INITIAL, sgd_factory(lr=0.5), snapshot_paths=[path]) as ((server,), endpoints):
        assert server.updates == 3
        watcher = observer(endpoints, LAYOUT)
        watcher.pull()
        for got, want in zip(watcher.targets, at_stop):
            np.testing.assert_array_equal(got, want)
        watcher.close()


def renamed(layout):
    """The same shapes, dtypes and parts under other names: only the fingerprint tells it apart."""
    return Layout([ParamSpec(p.name + "_other", p.shape, p.dtype) for p in layout.params], layout.num_servers,
                  layout.limit)


@pytest.mark.parametrize("setup", ["renamed parameters", "other server index", "other server count"])
def test_a_snapshot_from_another_setup_is_refused(tmp_path, setup):
    # two equal big parameters: with two servers each server holds one part of the same shape
    layout2 = Layout([ParamSpec("u", (BIG,), "<f4"), ParamSpec("v", (BIG,), "<f4")], 2, limit=BIG)
    initial2 = [np.zeros(BIG, "<f4"), np.ones(BIG, "<f4")]
    config = ServerConfig(snapshot_path=tmp_path / "server-0.snap", log_every=0)
    # server 0's snapshot, written without serving: two servers in threads of one process would share its
    # grad mode, which is one flag per process (disttrain.autograd.grad_mode)
    ParameterServer(0, layout2, initial2, sgd_factory(lr=0.5), config, log=lambda text: None).snapshot()
    index, layout = {"renamed parameters": (0, renamed(layout2)),
                     "other server index": (1, layout2),
                     "other server count": (0, Layout(layout2.params, 1, limit=BIG))}[setup]
    with pytest.raises(SnapshotError, match="written by another setup"):
        ParameterServer(index, layout, initial2, sgd_factory(lr=0.5), config, log=lambda text: None)
