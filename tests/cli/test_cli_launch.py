"""`disttrain launch`: a failed mpiexec job is run again from its last checkpoint, on another world size if asked."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli_testing import REPO, disttrain_cmd, run_disttrain
from processes import live_processes

HERE = Path(__file__).resolve().parent
mpiexec = Path(sys.executable).parent / "mpiexec"
pytestmark = [pytest.mark.skipif(not mpiexec.exists(), reason="no mpiexec beside this Python (pip install mpich)"),
              pytest.mark.mpi_skip]



def launch(job, tmp_path, *args, fail=None, settings=()):
    env = {"PYTHONPATH": os.pathsep.join([str(HERE / "fault_injection"), os.environ.get("PYTHONPATH", "")]),
           "DISTTRAIN_TEST_FAIL": fail or "", "DISTTRAIN_TEST_FAIL_MARKER": str(tmp_path / "failed"),
           "OMP_NUM_THREADS": "1"}
    job_options = ["--set", "parallel.mode=data", "--set", "train.max_steps=6", "--set", "train.checkpoint_every=2",
                   "--set", "train.log_every=1", *settings]
    return run_disttrain("launch", *args, job, *job_options, "--out", tmp_path / "out", timeout=240, env=env)


def restarts(done):
    return [line for line in done.stderr.splitlines() if line.startswith("disttrain launch: attempt")]


def test_a_job_that_fails_once_is_resumed_from_its_checkpoint_on_another_world_size(job_file, tmp_path):
    done = launch(job_file, tmp_path, "-n", "2", "--max-restarts", "2", "--restart-n", "1", fail="once")
    assert done.returncode == 0, done.stderr
    assert "injected failure in rank 1's third optimizer step" in done.stderr
    lines = restarts(done)
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("disttrain launch: attempt 1 on 2 rank(s) ended with exit status 1 after ")
    assert lines[0].endswith(f"restart 1 of 2 on 1 rank(s), resuming from the checkpoint of step 2 in "
                             f"{tmp_path / 'out'}")
    assert "resuming at step 2 (epoch 1)" in done.stdout and "data parallel: 1 rank (1 on this node)" in done.stdout
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]


def test_restarts_end_when_none_are_left(job_file, tmp_path):
    done = launch(job_file, tmp_path, "-n", "2", "--max-restarts", "1", fail="always")
    assert done.returncode == 1
    lines = restarts(done)
    assert len(lines) == 2 and "restart 1 of 1 on 2 rank(s)" in lines[0], done.stderr
    assert lines[1].startswith("disttrain launch: attempt 2 on 2 rank(s) ended with exit status 1; no restarts left")


def test_a_mistake_in_the_job_is_not_restarted(job_file, tmp_path):
    done = launch(job_file, tmp_path, "-n", "3", "--max-restarts", "2")
    assert done.returncode == 2
    assert done.stderr.count("[data] batch_size = 4 does not divide among the 3 ranks launched") == 1
    assert restarts(done) == ["disttrain launch: attempt 1 ended with exit status 2 (a mistake in the job or "
                              "options): not restarted"]


def test_a_diverging_job_is_not_restarted(job_file, tmp_path):
    done = launch(job_file, tmp_path, "-n", "2", "--max-restarts", "2",
                  settings=("--set", "optim.lr=1e37", "--set", "train.checkpoint_every=1"))
    assert done.returncode == 3, done.stderr
    assert "not finite; stopped" in done.stderr
    assert restarts(done) == ["disttrain launch: attempt 1 ended with exit status 3 (the run diverged: a restart "
                              "would diverge again): not restarted"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's prctl")
def test_the_job_stops_with_a_checkpoint_when_launch_is_killed(job_file, tmp_path):
    out = tmp_path / "out"
    cmd = disttrain_cmd("launch", "-n", "2", job_file, "--set", "parallel.mode=data", "--set",
                        "train.max_steps=1000000", "--set", "train.epochs=100000", "--set", "train.log_every=1",
                        "--out", out)
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while not (out / "metrics.jsonl").is_file() or not (out / "metrics.jsonl").read_text():
            assert time.monotonic() < deadline and proc.poll() is None, "the job never started"
            time.sleep(0.2)
        proc.kill()                                                  # SIGKILL: launch forwards nothing itself
        proc.wait(timeout=30)
        while live_processes("disttrain.cli.main", out) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not live_processes("disttrain.cli.main", out), "the ranks outlived disttrain launch"
        assert list((out / "checkpoints").glob("step-*")), "no checkpoint written on the way out"
    finally:
        for pid in live_processes("disttrain.cli.main", out):
            os.kill(pid, signal.SIGKILL)


def test_a_full_disk_ends_the_job_in_one_line_and_is_not_restarted(job_file, tmp_path):
    done = launch(job_file, tmp_path, "-n", "2", "--max-restarts", "2", fail="disk_full")
    assert done.returncode == 74, done.stderr
    checkpoints = tmp_path / "out" / "checkpoints"
    assert (f"disttrain run: error: cannot write {checkpoints / 'step-000004.tmp' / 'model.safetensors'}: No space "
            f"left on device; the last good checkpoint is {checkpoints / 'step-000002'}; free space and continue "
            f"with --resume\n") in done.stderr
    assert "Traceback" not in done.stderr and done.stderr.count("disttrain run: error:") == 1
    assert restarts(done) == ["disttrain launch: attempt 1 ended with exit status 74 (its files could not be "
                              "written: a restart would fail the same way): not restarted"]
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-000002"]      # no half-written step 4
