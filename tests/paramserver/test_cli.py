"""`disttrain ps-*` through the main entry point, and the [ps] section of job specs."""
import json
import os
import re
import socket
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from disttrain.cli.main import main
from disttrain.paramserver.snapshot import read_meta
from disttrain.train.jobspec import JobSpecError, describe_schema, loads_job

from disttrain.paramserver.job import layout_from_spec, server_from_spec, worker_run_dir
from disttrain.paramserver.worker import PSClient
from disttrain.train.saving import list_checkpoints, step_of

from ps_testing import serving, serving_job
from ps_user_models import user_job


def test_ps_keys_and_ps_cluster_through_disttrain_main(ps_job, tmp_path, capfd):
    assert main(["ps-keys", str(tmp_path / "keys"), "--workers", "2", "--client", "admin"]) == 0
    assert sorted(p.name for p in (tmp_path / "keys" / "clients").iterdir()) == ["admin.key", "worker-0.key",
                                                                                 "worker-1.key"]
    _, job = ps_job()
    out = tmp_path / "run"
    status = main(["ps-cluster", str(job), "--servers", "1", "--workers", "1", "--insecure", "--out", str(out),
                   "--set", "train.max_steps=30"])
    assert status == 0
    assert "final: valid ppl" in capfd.readouterr().out          # worker 0 prints to the terminal
    resolved = (out / "job.toml").read_text()
    assert 'mode = "ps"' in resolved and "workers = 1" in resolved and "max_steps = 30" in resolved
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["split"] == "test" and rows[-1]["step"] == 30


def test_unusable_jobs_and_options_exit_2(tmp_path, capsys):
    assert main(["ps-cluster", str(tmp_path / "missing.toml"), "--insecure"]) == 2
    assert "no such job file" in capsys.readouterr().err
    job = tmp_path / "job.toml"
    job.write_text('[ps]\nconsistency = "bsp"\n')
    assert main(["ps-server", str(job), "--index", "0", "--insecure"]) == 2
    assert '[ps] consistency = "bsp"' in capsys.readouterr().err


def test_ps_section_defaults_and_errors():
    spec = loads_job('[parallel]\nmode = "ps"\n[ps]\nservers = 3\nconsistency = "ssp"\nstaleness = 0\n')
    assert (spec.ps.servers, spec.ps.workers, spec.ps.consistency, spec.ps.staleness) == (3, 2, "ssp", 0)
    assert "[ps] heartbeat_timeout" in describe_schema()
    with pytest.raises(JobSpecError) as info:
        loads_job("[ps]\nservers = 0\nheartbeat_timeout = -1\nstaleness = true\nwokers = 2\n")
    message = str(info.value)
    for part in ("[ps] servers = 0", "[ps] heartbeat_timeout = -1", "[ps] staleness = true",
                 '(did you mean "workers"?)'):
        assert part in message


def test_ps_cluster_refuses_resumes_or_overwrites_an_earlier_run(ps_job, tmp_path, capfd):
    _, job = ps_job("data.batch_size=4")
    out = tmp_path / "run"
    base = ["ps-cluster", str(job), "--servers", "1", "--workers", "2", "--insecure", "--out", str(out)]
    assert main(base + ["--set", "train.max_steps=10"]) == 0
    capfd.readouterr()

    assert main(base + ["--set", "train.max_steps=10"]) == 2                  # no silent warm start
    err = capfd.readouterr().err
    assert f"{out} holds an earlier run" in err and "--resume" in err and "--overwrite" in err

    assert main(base + ["--resume", "--set", "train.max_steps=20"]) == 0      # servers and workers continue
    captured = capfd.readouterr()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if r["split"] == "train"]
    assert steps == sorted(set(steps)) and steps[-1] == 20 and rows[-1]["split"] == "test"
    assert "resuming from" in captured.err and "at step 10" in captured.err
    assert "worker 1: resuming from" in (out / "logs" / "worker-1.log").read_text()
    assert "resumed from" in (out / "logs" / "server-0.log").read_text()
    assert read_meta(out / "ps-snapshots" / "server-0.snap")["updates"] == 2 * 20     # each step applied once

    assert main(base + ["--overwrite", "--set", "train.max_steps=5"]) == 0
    assert read_meta(out / "ps-snapshots" / "server-0.snap")["updates"] == 2 * 5
    assert "resumed from" not in (out / "logs" / "server-0.log").read_text()

    assert main(["ps-cluster", str(job), "--insecure", "--out", str(tmp_path / "empty"), "--resume"]) == 2
    assert "holds no run to continue" in capfd.readouterr().err


def test_ps_cluster_resume_refuses_snapshots_behind_worker_0s_checkpoint(ps_job, tmp_path, capfd):
    _, job = ps_job("data.batch_size=4")
    out = tmp_path / "run"
    base = ["ps-cluster", str(job), "--servers", "1", "--workers", "2", "--insecure", "--out", str(out)]
    snapshot = out / "ps-snapshots" / "server-0.snap"
    assert main(base + ["--set", "train.max_steps=10"]) == 0
    older = snapshot.read_bytes()                                      # 20 updates, as at worker 0's step 10
    assert main(base + ["--resume", "--set", "train.max_steps=20"]) == 0
    snapshot.write_bytes(older)                                        # as if every later snapshot had failed
    capfd.readouterr()

    assert main(base + ["--resume", "--set", "train.max_steps=30"]) == 2
    err = capfd.readouterr().err.strip()
    checkpoints = out / "checkpoints"
    taken = re.search(r"the checkpoint was taken after (\d+);", err)   # worker 1's pushes after worker 0's last pull
    assert taken and int(taken.group(1)) > 20, err                     # may or may not be in it: from 30 to 40
    assert err == (f"disttrain ps-cluster: error: --resume: the servers' snapshots are behind worker 0's checkpoint "
                   f"{checkpoints / 'step-000020'} (step 20): {snapshot} holds 20 updates, the checkpoint was taken "
                   f"after {taken.group(1)}; resuming would continue that step from older weights: resume from worker "
                   f"0's older checkpoint {checkpoints / 'step-000010'} (step 10), which they are not behind, by "
                   f"moving the newer ones out of {checkpoints}, or start over with --overwrite")
    assert read_meta(snapshot)["updates"] == 20                        # nothing started

    (checkpoints / "step-000020").rename(tmp_path / "step-000020")     # the remedy it names
    assert main(base + ["--resume", "--set", "train.max_steps=30"]) == 0
    assert "worker 0: resuming from" in capfd.readouterr().err and "at step 10" in (out / "logs" / "worker-0.log").read_text()


@contextmanager
def server_from_snapshot(spec, snapshot):
    """Server 0 of the job, resuming from `snapshot` (or starting and writing it), in a thread; yields (server,
    endpoint); it writes its final snapshot when it stops."""
    server = server_from_spec(spec, 0, snapshot_path=snapshot, log=lambda text: None)
    with serving([server]) as endpoints:
        yield server, endpoints[0]


def pushes_of_another_worker(spec, endpoint, count):
    """Worker 1 joins server 0 at `endpoint` and pushes `count` zero gradients; returns its client (still joined)."""
    layout = layout_from_spec(spec, 1)
    client = PSClient([endpoint], layout, 1, heartbeat_interval=0.5, log=lambda text: None).connect()
    zeros = [np.zeros(p.size, dtype=p.dtype) for p in layout.params]
    for _ in range(count):
        client.push(zeros, pull=False)
    return client


def test_a_hand_started_worker_0_refuses_servers_behind_its_checkpoint(ps_job, tmp_path):
    """A server restarted from an old snapshot copy, which worker 1's pushes then carried past the checkpoint's
    update count (and worker 0's clock there, moved up to worker 1's): worker 0's latest push it holds is older."""
    spec, job = ps_job("ps.servers=1", "ps.workers=2", 'ps.consistency="async"', "data.batch_size=4")
    out, snapshot = tmp_path / "run", tmp_path / "server-0.snap"
    with server_from_snapshot(spec, snapshot) as (_, endpoint):
        first = ps_worker(job, out, endpoint, "--set", "train.max_steps=10")
        assert first.returncode == 0, first.stderr
    older = snapshot.read_bytes()                                     # 10 updates: worker 0's pushes 0 .. 9
    with server_from_snapshot(spec, snapshot) as (_, endpoint):
        second = ps_worker(job, out, endpoint, "--resume", "--set", "train.max_steps=20")
        assert second.returncode == 0 and "at step 10" in second.stderr, second.stderr
    newer = snapshot.read_bytes()
    snapshot.write_bytes(older)                                       # the server restarts from the old copy
    metrics = (out / "metrics.jsonl").read_bytes()

    with server_from_snapshot(spec, snapshot) as (server, endpoint):
        other = pushes_of_another_worker(spec, endpoint, 30)
        try:
            refused = ps_worker(job, out, endpoint, "--resume", "--set", "train.max_steps=30")
        finally:
            other.leave()
            other.close()
        assert server.updates == 10 + 30                              # worker 0 pushed nothing
    checkpoints = out / "checkpoints"
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.strip().splitlines()[-1] == (
        f"disttrain ps-worker: error: --resume: the servers are behind worker 0's checkpoint "
        f"{checkpoints / 'step-000020'} (step 20): server 0 at {endpoint} holds worker 0's pushes up to clock 9, the "
        f"checkpoint was taken after its push at clock 19; resuming would continue that step from older weights: "
        f"restart the server from a snapshot that is not behind (its newest), or resume from worker 0's older "
        f"checkpoint {checkpoints / 'step-000010'} (step 10), which they are not behind, by moving the newer ones "
        f"out of {checkpoints}, or start over with --overwrite")
    assert (out / "metrics.jsonl").read_bytes() == metrics

    snapshot.write_bytes(newer)                                       # the remedy it names first
    with server_from_snapshot(spec, snapshot) as (_, endpoint):
        resumed = ps_worker(job, out, endpoint, "--resume", "--set", "train.max_steps=30")
    assert resumed.returncode == 0 and "at step 20" in resumed.stderr, resumed.stderr


def test_ps_cluster_refuses_a_batch_its_workers_cannot_share(ps_job, tmp_path, capfd):
    _, job = ps_job("data.batch_size=4")
    assert main(["ps-cluster", str(job), "--workers", "3", "--insecure", "--out", str(tmp_path / "run")]) == 2
    assert "batch_size = 4 cannot be shared by 3 workers" in capfd.readouterr().err
    assert not (tmp_path / "run").exists()
    assert main(["ps-worker", str(job), "--id", "0", "--shards", "3", "--connect", "tcp://127.0.0.1:9", "--insecure",
                 "--out", str(tmp_path / "run")]) == 2
    assert "batch_size = 4 cannot be shared by 3 workers (--shards 3): it must be a multiple of --shards" in \
        capfd.readouterr().err


def ps_worker(job, out, endpoint, *extra, worker=0, env=None, stdout=subprocess.PIPE, stderr=subprocess.PIPE):
    """`disttrain ps-worker JOB --id WORKER --connect ENDPOINT --insecure --out OUT ...` as a process."""
    return subprocess.run([sys.executable, "-m", "disttrain.paramserver.cli", "ps-worker", str(job), "--id",
                           str(worker), "--connect", endpoint, "--insecure", "--out", str(out), *map(str, extra)],
                          stdout=stdout, stderr=stderr, text=True, timeout=180, env=env)


def test_a_worker_whose_checkpoint_cannot_be_written_says_so_in_one_line(ps_job, tmp_path):
    spec, job = ps_job("ps.servers=1", "ps.workers=1", "train.max_steps=6", "train.checkpoint_every=2")
    faults = Path(__file__).parents[1] / "cli" / "fault_injection"        # ENOSPC from the second checkpoint on
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(faults), os.environ.get("PYTHONPATH", "")]),
           "DISTTRAIN_TEST_FAIL": "disk_full", "PMI_RANK": "0"}
    out = tmp_path / "run"
    with serving_job(spec, 1) as (_, endpoints):
        done = ps_worker(job, out, endpoints[0], env=env)
    assert done.returncode == 74 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(
        f"worker 0: error: cannot write {out / 'checkpoints' / 'step-000004.tmp'}"), done.stderr
    assert done.stderr.strip().endswith(f"the last good checkpoint is {out / 'checkpoints' / 'step-000002'}; free "
                                        "space and continue with --resume")


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_a_worker_whose_log_cannot_be_written_says_so_in_one_line_with_exit_74(ps_job, tmp_path):
    """Its output on a full disk (ps-cluster's logs/worker-K.log): the one line of a run's files that cannot be
    written, and exit 74, no traceback; with stderr on the full disk too, the exit status alone says it."""
    spec, job = ps_job("ps.servers=1", "ps.workers=1", "train.max_steps=6")
    out = tmp_path / "run"
    with serving_job(spec, 1) as (_, endpoints), open("/dev/full", "w") as full:
        done = ps_worker(job, out, endpoints[0], stdout=full)          # its first line, before any checkpoint
        both = ps_worker(job, tmp_path / "both", endpoints[0], stdout=full, stderr=full)
    assert done.returncode == 74 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        "worker 0: error: cannot write /dev/full: No space left on device; no checkpoint of this run is on disk; "
        "free space and start the run again (with --overwrite where its directory holds files)"), done.stderr
    assert both.returncode == 74


def unused_port():
    with socket.socket() as s:            # bound and closed: nobody listens there afterwards
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_worker_that_reaches_no_server_says_so_and_leaves_its_out_dir_free(ps_job, tmp_path):
    _, job = ps_job()
    out, endpoint = tmp_path / "run", f"tcp://127.0.0.1:{unused_port()}"
    for attempt in range(2):                      # the same command again: not refused as an earlier run
        done = ps_worker(job, out, endpoint, "--set", "ps.reconnect_timeout=2")
        assert done.returncode == 1, done.stderr
        lines = done.stderr.strip().splitlines()
        waiting = f"worker 0: joining 1 server(s) at {endpoint}; waiting up to 2 s ([ps] reconnect_timeout)"
        assert lines[-2:] == [waiting, f"worker 0: error: server 0: no answer from {endpoint} to join within 2 s "
                                       f"([ps] reconnect_timeout) [unreachable]"], done.stderr
        assert not out.exists(), sorted(p.name for p in out.iterdir())


@pytest.mark.parametrize("worker", [0, 1])
def test_ps_worker_refuses_an_earlier_run_unless_overwrite(ps_job, tmp_path, worker):
    """Worker 0 owns the run directory (metrics, checkpoints); worker K its checkpoints in workers/worker-K."""
    spec, job = ps_job("ps.servers=1", "ps.workers=2", 'ps.consistency="async"', "data.batch_size=4",
                       "train.max_steps=4")
    out = tmp_path / "run"
    run = lambda endpoint, *extra: ps_worker(job, out, endpoint, *extra, worker=worker)     # noqa: E731
    with serving_job(spec, 1) as (_, endpoints):
        first = run(endpoints[0])
        assert first.returncode == 0, first.stderr
    with serving_job(spec, 1) as (_, endpoints):
        again = run(endpoints[0])
        assert again.returncode == 2 and "holds an earlier run" in again.stderr, again.stderr
        assert "joining" not in again.stderr                          # refused before waiting for the servers
        over = run(endpoints[0], "--overwrite", "--set", "train.max_steps=2")
        assert over.returncode == 0, over.stderr
    assert [step_of(c) for c in list_checkpoints(worker_run_dir(out, worker))] == [2]    # the new run's only
    if worker == 0:
        assert max(json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()) == 2
    both = run("tcp://127.0.0.1:9", "--resume", "--overwrite")
    assert both.returncode == 2 and "not allowed with argument" in both.stderr


@pytest.mark.parametrize("model, status", [("buffered", 2), ("frozen", 0)])
def test_eval_refuses_snapshots_of_a_model_with_buffers_and_names_worker_0s_checkpoint(model, status, tmp_path,
                                                                                       capsys):
    """Snapshots hold parameters only: a model with running statistics would be evaluated with their initial
    values. Its snapshots are refused in one line naming the run directory, whose checkpoints hold them."""
    spec = user_job(model, "ps.servers=1", "ps.workers=1", source=str(tmp_path / "job.toml"))
    job = tmp_path / "job.toml"
    job.write_text(spec.to_toml())
    snapshots = tmp_path / "run" / "ps-snapshots"
    snapshots.mkdir(parents=True)
    server_from_spec(spec, 0, snapshot_path=snapshots / "server-0.snap", log=lambda text: None).snapshot()
    assert main(["eval", str(job), "--checkpoint", str(snapshots)]) == status
    if status:
        (line,) = capsys.readouterr().err.splitlines()
        assert "1.running_mean" in line and f"--checkpoint {tmp_path / 'run'}" in line, line
