"""Faults: a server killed and restarted loses only what came after its last snapshot (SIGTERM: nothing), and
the worker reconnects by itself; a worker killed mid-run is dropped and the others finish."""
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from disttrain.autograd.grad_mode import no_grad
from disttrain.paramserver.alerts import ALERT_PREFIX, SnapshotFailures
from disttrain.paramserver.cluster import ADMIN_ID, Cluster
from disttrain.paramserver.sharding import Layout
from disttrain.paramserver.job import initial_model
from disttrain.paramserver.server import FinalSnapshotError, ParameterServer, ServerConfig
from disttrain.paramserver.worker import PSClient
from disttrain.tensor.tensor import Tensor
from disttrain.train.build import build_optimizer, build_schedules

from ps_testing import observer, raw_peer, running_servers, sgd_factory


def start_server(job, tmp_path, port, snapshot):
    endpoint_file = tmp_path / f"endpoint-{time.monotonic_ns()}"
    log = open(tmp_path / "server.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "disttrain.paramserver.cli", "ps-server", str(job), "--index", "0",
                             "--bind", f"tcp://127.0.0.1:{port}", "--endpoint-file", str(endpoint_file),
                             "--snapshot", str(snapshot), "--insecure"], stdout=log, stderr=log)
    log.close()
    deadline = time.monotonic() + 60
    while not endpoint_file.exists():
        assert proc.poll() is None, (tmp_path / "server.log").read_text()
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    return proc, endpoint_file.read_text().strip()


class Reference:
    """The job's optimizer applied locally to the same gradients: what the server must hold."""

    def __init__(self, spec):
        self.model = initial_model(spec)
        self.params = list(self.model.parameters())
        self.optimizer = build_optimizer(spec, self.params)
        self.schedules = build_schedules(spec, self.optimizer)

    def apply(self, grads):
        for p, g in zip(self.params, grads):
            p.grad = Tensor(g.reshape(p.shape))
        with no_grad():
            self.optimizer.step()
        for p in self.params:
            p.grad = None
        if self.schedules.step is not None:
            self.schedules.step.step()

    def flat(self):
        return [p.numpy().reshape(-1).copy() for p in self.params]


def gradients(layout, n, seed):
    rng = np.random.default_rng(seed)
    return [[rng.standard_normal(p.size).astype(p.dtype) for p in layout.params] for _ in range(n)]


def test_server_crash_loses_only_updates_after_the_snapshot(ps_job, tmp_path):
    spec, job = ps_job("ps.servers=1", "ps.snapshot_every=4", "optim.kind=adam", "optim.warmup_steps=3")
    layout = Layout.from_named_arrays(initial_model(spec).named_parameters(), 1)
    snapshot = tmp_path / "server-0.snap"
    first, later = gradients(layout, 6, seed=1), gradients(layout, 2, seed=2)
    ref = Reference(spec)
    for g in first[:4]:
        ref.apply(g)
    at_snapshot = ref.flat()
    for g in later:
        ref.apply(g)
    at_end = ref.flat()

    proc, endpoint = start_server(job, tmp_path, 0, snapshot)
    port = int(endpoint.rsplit(":", 1)[1])
    targets = [np.zeros(p.size, p.dtype) for p in layout.params]
    client = PSClient([endpoint], layout, 0, heartbeat_interval=0.2, server_timeout=2.0, reconnect_timeout=30.0)
    try:
        client.connect(targets, timeout=30)
        for g in first:                                   # 6 updates: the snapshot holds the first 4
            client.push(g, pull=False)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        proc, _ = start_server(job, tmp_path, port, snapshot)
        client.pull()                                     # reconnects and rejoins by itself
        assert client.reconnects >= 1
        for got, want in zip(targets, at_snapshot):
            np.testing.assert_array_equal(got, want)      # exactly the snapshot: updates 5 and 6 are lost
        log = (tmp_path / "server.log").read_text()
        assert re.search(rf"resumed from {re.escape(str(snapshot))}, written [0-9.]+ s ago: 4 updates", log)
        assert "worker 0 was at clock 6 here and continues at 4: 2 of its updates were lost" in log
        for g in later:                                   # optimizer state and LR schedule resumed too
            client.push(g, pull=True)
        for got, want in zip(targets, at_end):
            np.testing.assert_array_equal(got, want)

        proc.send_signal(signal.SIGTERM)                  # a clean stop snapshots everything
        assert proc.wait(timeout=30) == 0
        proc, _ = start_server(job, tmp_path, port, snapshot)
        client.pull()
        for got, want in zip(targets, at_end):
            np.testing.assert_array_equal(got, want)      # nothing lost
        assert client.stats(0)["updates"] == 6
    finally:
        client.close()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)


def test_a_server_killed_before_any_update_restarts_from_its_first_snapshot(ps_job, tmp_path):
    """The snapshot is written before the server listens: a server killed at once restarts from that file (not
    from a path that does not exist), and the log says exactly what it restored and what was lost."""
    spec, _ = ps_job("ps.servers=1", "ps.workers=1", "ps.snapshot_every=100000", "ps.snapshot_every_s=0",
                     "data.batch_size=4", n_chars=6000)
    messages = []
    cluster = Cluster(spec, tmp_path / "run", insecure=True, quiet=True, log=messages.append)
    with cluster:
        cluster.prepare()
        cluster.start_server(0)
        cluster.wait_for_servers()
        assert cluster.snapshot_path(0).exists()
        assert re.fullmatch(r".*server-0\.snap, written [0-9.]+ s ago, holding 0 updates .*",
                            cluster.restart_source(0))
        cluster.start_worker(0)
        layout = Layout.from_named_arrays(initial_model(spec).named_parameters(), 1)
        watcher = observer([cluster.endpoints[0]], layout, worker_id=ADMIN_ID)
        deadline = time.monotonic() + 60
        while watcher.stats(0)["updates"] < 5:
            assert time.monotonic() < deadline, "training did not start"
            time.sleep(0.05)
        watcher.close()
        cluster.kill_server(0)
        codes = cluster.supervise(timeout=120)
    assert codes == {0: 0} and cluster.restarts == 1
    assert any("restarting it from" in m and "holding 0 updates" in m for m in messages), messages
    log = cluster.log_path("server-0").read_text()
    assert re.search(r"resumed from \S+server-0\.snap, written [0-9.]+ s ago: 0 updates", log)
    assert re.search(r"worker 0 was at clock (\d+) here and continues at 0: \1 of its updates were lost", log)


def test_servers_snapshot_by_time():
    layout = Layout.from_named_arrays([("w", np.zeros(8, "<f4"))], 1)
    with tempfile.TemporaryDirectory() as tmp, \
            running_servers(layout, [np.zeros(8, "<f4")], sgd_factory(),
                            {"snapshot_every": 0, "snapshot_every_s": 0.2},
                            snapshot_paths=[Path(tmp) / "s.snap"]) as ((server,), endpoints):
        assert server.snapshots == 1                            # at start
        client = PSClient(endpoints, layout, 0, heartbeat_interval=0.2)
        try:
            client.connect([np.zeros(8, "<f4")], timeout=10)
            deadline = time.monotonic() + 60
            while server.snapshots < 3:
                client.push([np.ones(8, "<f4")], pull=False)
                assert time.monotonic() < deadline, "no snapshot by time"
                time.sleep(0.05)
            time.sleep(1.0)                                     # the last updates get their snapshot ...
            quiet = server.snapshots
            time.sleep(1.0)
            assert server.snapshots == quiet                    # ... and without updates there is none
        finally:
            client.close()


def test_killed_worker_is_dropped_and_the_others_finish(ps_job, tmp_path):
    spec, _ = ps_job("ps.servers=1", "ps.workers=3", "ps.consistency=sync", "ps.heartbeat_timeout=1.5",
                     "data.batch_size=6", n_chars=6000)
    cluster = Cluster(spec, tmp_path / "run", insecure=True, quiet=True, log=lambda text: None)
    with cluster:
        cluster.start()
        layout = Layout.from_named_arrays(initial_model(spec).named_parameters(), 1)
        watcher = observer([cluster.endpoints[0]], layout, worker_id=ADMIN_ID)
        deadline = time.monotonic() + 60
        while len(clocks := watcher.stats(0)["clocks"]) < 3 or min(clocks.values()) < 10:
            assert time.monotonic() < deadline, "training did not start"
            time.sleep(0.05)
        cluster.kill_worker(2)
        codes = cluster.supervise(timeout=90)
        stats = watcher.stats(0)
        watcher.close()
    assert codes[0] == 0 and codes[1] == 0 and codes[2] == -signal.SIGKILL
    assert 2 in stats["dropped"]
    log = (tmp_path / "run" / "logs" / "server-0.log").read_text()
    assert "dropped worker 2" in log
    rows = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["split"] == "test"                         # worker 0 finished and evaluated
    assert stats["round"] == rows[-1]["step"]                  # every sync round completed, without worker 2


def test_cluster_restarts_a_dead_server_and_workers_carry_on(ps_job, tmp_path):
    spec, _ = ps_job("ps.servers=2", "ps.workers=2", "ps.snapshot_every=10", "data.batch_size=4", n_chars=6000)
    cluster = Cluster(spec, tmp_path / "run", insecure=True, quiet=True, log=lambda text: None)
    with cluster:
        cluster.start()
        layout = Layout.from_named_arrays(initial_model(spec).named_parameters(), 2)
        watcher = observer([cluster.endpoints[i] for i in range(2)], layout, worker_id=ADMIN_ID)
        deadline = time.monotonic() + 60
        while len((stats := watcher.stats(1))["clocks"]) < 2 or stats["snapshots"] < 2:   # both workers on it
            assert time.monotonic() < deadline, "no snapshot was written"
            time.sleep(0.05)
        watcher.close()
        cluster.kill_server(1)                     # supervise() notices and restarts it from its snapshot
        codes = cluster.supervise(timeout=90)
    assert codes == {0: 0, 1: 0} and cluster.restarts == 1
    log = (tmp_path / "run" / "logs" / "server-1.log").read_text()
    assert "resumed from" in log
    for k in (0, 1):
        assert "reconnecting to server 1" in (tmp_path / "run" / "logs" / f"worker-{k}.log").read_text()


def test_a_dropped_worker_rejoins_where_the_server_has_it():
    """A worker whose push was applied but whose reply was lost is dropped, then joins again asking for the
    clock it still believes in: the server keeps its own count and says which push it holds last, so the
    waiting push is not applied a second time."""
    layout = Layout.from_named_arrays([("w", np.zeros(8, "<f4"))], 1)
    grad = [np.ones(8, "<f4")]
    with running_servers(layout, [np.zeros(8, "<f4")], sgd_factory(), {"heartbeat_timeout": 0.5}) \
            as ((server,), endpoints):
        with raw_peer(endpoints[0]) as first:
            first.join(layout, 5)
            assert first.request("push", grad, worker=5, clock=0, keys=[0])["op"] == "ok"   # the "lost" reply
        deadline = time.monotonic() + 30
        while 5 not in server.membership.dropped:
            assert time.monotonic() < deadline, "the silent worker was not dropped"
            time.sleep(0.05)
        with raw_peer(endpoints[0]) as again:
            reply = again.join(layout, 5)                       # asks for clock 0, as before the lost reply
            assert reply["clock"] == 1 and reply.get("last_push") == 0
            again.request("push", grad, worker=5, clock=0, keys=[0])        # a resend is not applied again
        assert server.updates == 1


def test_restored_servers_know_each_workers_clock_and_last_push(tmp_path):
    layout = Layout.from_named_arrays([("w", np.zeros(8, "<f4"))], 1)
    config = {"snapshot_every": 0}
    with running_servers(layout, [np.zeros(8, "<f4")], sgd_factory(), config,
                         snapshot_paths=[tmp_path / "s.snap"]) as (_, endpoints), raw_peer(endpoints[0]) as peer:
        peer.join(layout, 2)
        for clock in range(3):
            peer.request("push", [np.ones(8, "<f4")], worker=2, clock=clock, keys=[0])
    with running_servers(layout, [np.zeros(8, "<f4")], sgd_factory(), config,
                         snapshot_paths=[tmp_path / "s.snap"]) as ((server,), endpoints), \
            raw_peer(endpoints[0]) as peer:
        assert server.updates == 3
        reply = peer.join(layout, 2)
        assert (reply["clock"], reply["last_push"]) == (3, 2)
        assert peer.join(layout, 7).get("last_push") is None and peer.join(layout, 7)["clock"] == 3


def test_sync_a_worker_dropped_after_its_push_is_not_counted_twice_in_the_round():
    """Worker 5 pushes for round 0, falls silent and is dropped while worker 6 has not pushed yet (its gradient
    stays in the round); when it rejoins it is at the next clock, so the round still averages 5 and 6 once each."""
    layout = Layout.from_named_arrays([("w", np.zeros(4, "<f4"))], 1)
    with running_servers(layout, [np.zeros(4, "<f4")], sgd_factory(lr=1.0, momentum=0.0),
                         {"consistency": "sync", "heartbeat_timeout": 0.5, "expect_workers": 2}) \
            as ((server,), endpoints), raw_peer(endpoints[0]) as five, raw_peer(endpoints[0]) as six:
        five.join(layout, 5)
        six.join(layout, 6)
        assert five.request("push", [np.full(4, 2.0, "<f4")], worker=5, clock=0, keys=[0])["op"] == "ok"
        deadline = time.monotonic() + 30
        while 5 not in server.membership.dropped:
            assert time.monotonic() < deadline, "the silent worker was not dropped"
            six.request("heartbeat", worker=6)
            time.sleep(0.1)
        reply = five.join(layout, 5)
        assert reply["clock"] == 1 and reply["last_push"] == 0
        assert six.request("push", [np.full(4, 4.0, "<f4")], worker=6, clock=0, keys=[0])["op"] == "ok"
        assert server.round == 1
        np.testing.assert_array_equal(server.shards[0].data, np.full(4, -3.0, "<f4"))    # -(2 + 4) / 2


def test_a_snapshot_that_cannot_be_written_is_an_alert_once_and_the_push_still_answered(tmp_path):
    layout = Layout.from_named_arrays([("w", np.zeros(4, "<f4"))], 1)
    where = tmp_path / "snapshots"
    with running_servers(layout, [np.zeros(4, "<f4")], sgd_factory(), {"snapshot_every": 1},
                         snapshot_paths=[where / "s.snap"]) as ((server,), endpoints), raw_peer(endpoints[0]) as peer:
        logged = []
        server.log = logged.append
        shutil.rmtree(where)
        where.write_text("a file where the snapshot directory was")
        peer.join(layout, 0)
        for clock in range(3):
            assert peer.request("push", [np.ones(4, "<f4")], worker=0, clock=clock, keys=[0])["op"] == "ok"
        assert server.updates == 3
        alerts = [line for line in logged if line.startswith(ALERT_PREFIX)]
        assert alerts == [f"{ALERT_PREFIX}server 0: snapshot {where / 's.snap'} FAILED: File exists; its last "
                          f"good snapshot holds 0 of its 1 updates (a crash now loses the others); it tries again at "
                          f"every due snapshot"], logged                   # the next failures within a minute: none
        where.unlink()                                  # the volume is back
        assert peer.request("push", [np.ones(4, "<f4")], worker=0, clock=3, keys=[0])["op"] == "ok"
        assert logged[-1] == f"{ALERT_PREFIX}server 0: snapshot {where / 's.snap'} written again, after 3 failed"
    assert sorted(p.name for p in where.iterdir()) == ["s.snap"]


def test_failed_snapshots_are_reported_at_most_once_a_minute_with_a_count():
    now = [0.0]
    alerts = []
    failures = SnapshotFailures(alerts.append, "server 1", interval=60.0, clock=lambda: now[0])
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    for t, updates in ((0, 10), (10, 20), (30, 30), (61, 40)):
        now[0] = t
        failures.failed("s.snap", full, updates, kept=5)
    assert alerts == ["server 1: snapshot s.snap FAILED: No space left on device; its last good snapshot holds 5 of "
                      "its 10 updates (a crash now loses the others); it tries again at every due snapshot",
                      "server 1: snapshot s.snap FAILED: No space left on device (3 failures in the last 61 s); its "
                      "last good snapshot holds 5 of its 40 updates (a crash now loses the others); it tries again at "
                      "every due snapshot"]
    failures.written("s.snap")
    assert alerts[-1] == "server 1: snapshot s.snap written again, after 4 failed"
    now[0] = 70
    failures.failed("s.snap", full, 50, kept=40)            # a new failure after a success: reported at once
    assert len(alerts) == 4 and "holds 40 of its 50 updates" in alerts[-1]


def test_a_final_snapshot_that_cannot_be_written_raises_one_line_after_closing(tmp_path):
    layout = Layout.from_named_arrays([("w", np.zeros(4, "<f4"))], 1)
    where = tmp_path / "snapshots"
    config = ServerConfig(snapshot_path=where / "s.snap", log_every=0)
    server = ParameterServer(0, layout, [np.zeros(4, "<f4")], sgd_factory(), config, log=lambda text: None)
    server.start()
    shutil.rmtree(where)
    where.write_text("a file where the snapshot directory was")
    with pytest.raises(FinalSnapshotError) as info:
        server.close()
    assert str(info.value) == (f"server 0 could not write its final snapshot {where / 's.snap'}: File exists; its "
                               f"last good snapshot holds 0 of its 0 updates (a restart or --resume loses the others)")
    assert server.socket is None and server.context is None
