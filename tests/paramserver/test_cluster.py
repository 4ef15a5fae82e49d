"""End to end: `ps-cluster` with CURVE keys, 2 servers and 4 async workers trains a tiny char LSTM."""
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from disttrain.paramserver.alerts import ALERT_PREFIX
from disttrain.paramserver.cluster import Cluster, _AlertFollower, child_command
from processes import live_processes
from disttrain.train.loop import Trainer


def test_ps_cluster_async_four_workers_trains(ps_job, tmp_path):
    spec, job = ps_job("data.batch_size=8", "train.epochs=2", n_chars=4000)
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "disttrain.paramserver.cli", "ps-cluster", str(job),
                           "--servers", "2", "--workers", "4", "--out", str(out)],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "CURVE" in proc.stderr and "final: valid ppl" in proc.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    valid = [r for r in rows if r["split"] == "valid"]
    local = Trainer.from_job(spec, out_dir=None, progress=False)
    local.fit()
    vocab = local.data.vocab_size
    assert train[-1]["loss"] < train[0]["loss"] - 0.5 and valid[-1]["loss"] < 0.6 * math.log(vocab)  # learned
    assert valid[-1]["loss"] < 1.25 * local.evals["valid"].loss                     # near local training
    for name in ("curves.png", "config.toml", "checkpoints", "keys/server.key", "keys/clients/worker-3.key",
                 "ps-snapshots/server-0.snap", "ps-snapshots/server-1.snap", "logs/server-1.log"):
        assert (out / name).exists(), name
    for i in range(2):
        log = (out / "logs" / f"server-{i}.log").read_text()
        assert "CURVE" in log and "worker 3 joined" in log and "stopped after" in log


def test_children_never_import_a_disttrain_from_the_working_directory(ps_job, tmp_path, monkeypatch):
    spec, _ = ps_job("ps.servers=1", "ps.workers=1", "train.max_steps=5")
    impostor = tmp_path / "cwd" / "disttrain"
    impostor.mkdir(parents=True)
    (impostor / "__init__.py").write_text('raise SystemExit("imported the disttrain of the working directory")\n')
    monkeypatch.chdir(impostor.parent)
    with Cluster(spec, tmp_path / "run", insecure=True, quiet=True, log=lambda text: None) as cluster:
        cluster.start()
        assert cluster.supervise(timeout=120) == {0: 0}
    assert "working directory" not in (tmp_path / "run" / "logs" / "server-0.log").read_text()
    assert child_command("m", ["x"])[:2] == [sys.executable, "-P" if sys.version_info >= (3, 11) else "-I"]


def test_a_worker_failing_at_start_reaches_its_log_and_the_console(ps_job, tmp_path, capfd):
    spec, _ = ps_job("ps.servers=1", "ps.workers=2", "memory.budget_mb=0.001")
    messages = []
    with Cluster(spec, tmp_path / "run", insecure=True, log=messages.append) as cluster:
        cluster.start()
        codes = cluster.supervise(timeout=120)
    assert codes == {0: 1, 1: 1}
    console = capfd.readouterr().err
    for k in (0, 1):
        log = cluster.log_path(f"worker-{k}").read_text()
        assert "budget_mb = 0.001" in log, log
    assert "budget_mb = 0.001" in console                              # worker 0: its stderr, as it happened
    shown = [m for m in messages if m.startswith("worker 1 exited with status 1")]
    assert shown and "budget_mb = 0.001" in shown[0]                   # worker 1: the end of its log


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's prctl")
def test_servers_and_workers_stop_when_the_cluster_is_killed(ps_job, tmp_path):
    _, job = ps_job("ps.servers=1", "ps.workers=1", "train.max_steps=100000", "train.checkpoint_every=100000")
    out = tmp_path / "run"
    cluster = subprocess.Popen([sys.executable, "-m", "disttrain.paramserver.cli", "ps-cluster", str(job), "--out",
                                str(out), "--insecure"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while "joined" not in _read(out / "logs" / "server-0.log") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert live_processes("ps-server", out) and live_processes("ps-worker", out)
        cluster.kill()                                               # SIGKILL: no handler of its own runs
        cluster.wait(timeout=30)
        while (live_processes("ps-server", out) or live_processes("ps-worker", out)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not live_processes("ps-server", out) and not live_processes("ps-worker", out)
        assert "stopped after" in _read(out / "logs" / "server-0.log")          # a stop by SIGTERM: its snapshot
    finally:
        for pid in live_processes("ps-server", out) + live_processes("ps-worker", out):
            os.kill(pid, signal.SIGKILL)


def _read(path):
    return path.read_text() if path.exists() else ""


def test_a_cluster_whose_main_worker_is_killed_exits_as_a_shell_reports_it(ps_job, tmp_path):
    _, job = ps_job("ps.servers=1", "ps.workers=1", "train.max_steps=100000", "train.checkpoint_every=100000")
    out = tmp_path / "run"
    cluster = subprocess.Popen([sys.executable, "-m", "disttrain.paramserver.cli", "ps-cluster", str(job), "--out",
                                str(out), "--insecure"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while "joined" not in _read(out / "logs" / "server-0.log") and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in live_processes("ps-worker", out):
            os.kill(pid, signal.SIGKILL)
        _, err = cluster.communicate(timeout=120)
        assert cluster.returncode == 128 + signal.SIGKILL, err         # not -9 & 0xff = 247
    finally:
        cluster.kill()


def test_snapshots_that_cannot_be_written_reach_the_terminal_and_fail_the_run(ps_job, tmp_path):
    spec, _ = ps_job("ps.servers=2", "ps.workers=1", "ps.snapshot_every=5", "train.max_steps=40")
    out = tmp_path / "run"
    snapshots = out / "ps-snapshots"

    def break_the_volume():                 # as a full or read-only snapshot volume would, once the servers run
        deadline = time.monotonic() + 120
        while not all((snapshots / f"server-{i}.snap").exists() for i in (0, 1)) and time.monotonic() < deadline:
            time.sleep(0.01)
        snapshots.rename(out / "moved-snapshots")
        snapshots.write_text("a file where the snapshot directory was")

    messages = []
    breaker = threading.Thread(target=break_the_volume)
    breaker.start()
    status = Cluster(spec, out, insecure=True, quiet=True, log=messages.append).run()
    breaker.join()
    assert status == 1 and not any(m.startswith("done") for m in messages), messages
    for i in (0, 1):
        path = snapshots / f"server-{i}.snap"
        periodic = [m for m in messages if m.startswith(f"server {i}: snapshot {path} FAILED: File exists")]
        assert len(periodic) == 1, messages                    # the first failure, at once; no more within a minute
        final = [m for m in messages if m.startswith(f"error: server {i} could not write its final snapshot")]
        assert final == [f"error: server {i} could not write its final snapshot {path}: File exists; its last good "
                         f"snapshot holds 0 of its 40 updates (a restart or --resume loses the others)"], messages
        assert "Traceback" not in cluster_log(out, i)
    assert messages.index(periodic[0]) < messages.index(final[0])


def cluster_log(out, server):
    return (out / "logs" / f"server-{server}.log").read_text()


def test_alerts_are_followed_from_the_end_of_an_earlier_runs_log(tmp_path):
    log = tmp_path / "server-0.log"
    log.write_text(f"{ALERT_PREFIX}server 0: shown by the earlier run\n")
    follower = _AlertFollower(log)
    with open(log, "a") as fh:
        fh.write(f"server 0: a line for the log only\n{ALERT_PREFIX}server 0: new\n{ALERT_PREFIX}server 0: half")
    assert follower.new_alerts() == ["server 0: new"]
    with open(log, "a") as fh:
        fh.write(" a line\n")
    assert follower.new_alerts() == ["server 0: half a line"] and follower.new_alerts() == []
