"""Kill a real `disttrain run` (SIGKILL after its first checkpoint), `--resume` it, and compare every step's
metrics with an uninterrupted run; SIGTERM checkpoints before exiting."""
import os
import signal
import subprocess
import time

import pytest

from cli_testing import REPO, disttrain_cmd, metric_rows, run_disttrain

STEPS = 300


def job_args(job_file, text_file, out):
    return ["run", job_file, "--set", "data.kind=chars", "--set", f"data.path={text_file}",
            "--set", f"train.max_steps={STEPS}", "--set", "train.epochs=50", "--set", "train.log_every=1",
            "--set", "train.eval_every=100", "--set", "train.checkpoint_every=20", "--out", out]


def start(args):
    return subprocess.Popen(disttrain_cmd(*args), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)


def wait_for_a_checkpoint(out, proc, timeout=60):
    """Until some complete checkpoint is in out/checkpoints (its manifest is the last file a save writes)."""
    deadline = time.monotonic() + timeout
    while not list((out / "checkpoints").glob("step-*[0-9]/manifest.json")):
        assert proc.poll() is None, f"run ended before a checkpoint appeared: {proc.stderr.read()}"
        assert time.monotonic() < deadline, f"no checkpoint appeared in {out} in {timeout} s"
        time.sleep(0.005)


def train_rows(run_dir):
    return [r for r in metric_rows(run_dir) if r["split"] == "train"]


def test_sigkill_then_resume_equals_uninterrupted(job_file, text_file, tmp_path):
    whole = run_disttrain(*job_args(job_file, text_file, tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr

    out = tmp_path / "run"
    proc = start(job_args(job_file, text_file, out))
    wait_for_a_checkpoint(out, proc)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(30) == -signal.SIGKILL
    proc.stderr.close()
    killed_rows = train_rows(out)
    assert len(killed_rows) < STEPS                           # it really died mid-run

    resumed = run_disttrain(*job_args(job_file, text_file, out), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming at step" in resumed.stdout
    rows = train_rows(out)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert rows == train_rows(tmp_path / "whole")             # same loss, lr, grad norm at every step
    assert metric_rows(out) == metric_rows(tmp_path / "whole")  # and the same evaluations


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_writes_a_checkpoint_then_exits(job_file, text_file, tmp_path, sig, code):
    out = tmp_path / "run"
    proc = start(job_args(job_file, text_file, out))
    wait_for_a_checkpoint(out, proc)
    proc.send_signal(sig)
    assert proc.wait(30) == code
    err = proc.stderr.read()
    proc.stderr.close()
    assert f"{signal.Signals(sig).name}: writing a checkpoint" in err and "continue with --resume" in err
    from disttrain.train import load_checkpoint

    step = load_checkpoint(out).meta["step"]
    assert step == len(train_rows(out)) < STEPS and not load_checkpoint(out).meta["finished"]
    assert not list((out / "checkpoints").glob("*.tmp")) and not list((out / "checkpoints").glob("*.prev"))
