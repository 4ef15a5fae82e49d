"""Jobs launched with mpiexec as subprocesses: errors must end every rank, never hang (each has a timeout)."""
import json
import sys
import time

import pytest

from parallel_testing import HERE, needs_mpiexec, run_mpiexec, text
from tiny_jobs import DATA_PARALLEL, tiny_job_toml

pytestmark = [needs_mpiexec, pytest.mark.mpi_skip]
SCRIPTS = HERE / "mpi_scripts"


def test_mismatched_model_is_an_error_on_every_rank(tmp_path):
    done = run_mpiexec(2, [sys.executable, SCRIPTS / "mismatched_model.py", tmp_path], timeout=60)
    assert done.returncode == 0, done.stderr
    messages = [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)]
    assert messages[0] == messages[1]
    assert "rank 1 vs rank 0: '0.weight' shape (9, 3) (rank 0: (8, 3))" in messages[0]


def test_a_rank_raising_ends_the_job():
    start = time.monotonic()
    done = run_mpiexec(2, [sys.executable, SCRIPTS / "rank_raises.py"], timeout=60)
    assert done.returncode != 0
    assert time.monotonic() - start < 30
    assert "[rank 1 of 2] failed; aborting the job" in done.stderr and "boom on rank 1" in done.stderr
    assert "got past" not in done.stdout




def train_rows(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["split"], r["loss"]) for r in rows]


def test_disttrain_run_under_mpiexec_equals_one_process(tmp_path):
    (tmp_path / "tiny.txt").write_text(text())
    job = tmp_path / "tiny.toml"
    job.write_text(tiny_job_toml(*DATA_PARALLEL, text=tmp_path / "tiny.txt"))
    cli = [sys.executable, "-m", "disttrain.cli.main", "run", job]
    done = run_mpiexec(2, [*cli, "--out", tmp_path / "dp", "--trace", tmp_path / "dp.trace.json"], timeout=120)
    assert done.returncode == 0, done.stderr
    local = run_mpiexec(1, [*cli, "--out", tmp_path / "local"], timeout=120)
    assert local.returncode == 0, local.stderr
    got, want = train_rows(tmp_path / "dp"), train_rows(tmp_path / "local")
    assert [r[:2] for r in got] == [r[:2] for r in want] and len(got) >= 5
    for (_, _, a), (_, _, b) in zip(got, want):
        assert a == pytest.approx(b, rel=1e-5)
    assert (tmp_path / "dp" / "checkpoints").is_dir()
    events = json.loads((tmp_path / "dp.trace.json").read_text())["traceEvents"]
    spans = [e for e in events if e["ph"] == "X"]
    assert {e["pid"] for e in spans} == {0, 1}
    assert any(e["name"].startswith("allreduce bucket") for e in spans)


def test_disttrain_run_rank_failure_ends_the_job(tmp_path):
    (tmp_path / "tiny.txt").write_text(text())
    job = tmp_path / "tiny.toml"
    job.write_text(tiny_job_toml(*DATA_PARALLEL, "train.max_steps=1000", text=tmp_path / "tiny.txt"))
    start = time.monotonic()
    # rank 1's third optimizer step raises while rank 0 waits in the next step's allreduce
    done = run_mpiexec(2, [sys.executable, HERE / "mpi_scripts" / "cli_rank_fails.py", job, tmp_path / "out"],
                       timeout=90)
    assert done.returncode != 0
    assert time.monotonic() - start < 60
    assert "[rank 1 of 2] failed; aborting the job" in done.stderr and "injected failure" in done.stderr


def test_local_mode_job_under_mpiexec_is_refused(tmp_path):
    (tmp_path / "tiny.txt").write_text(text())
    job = tmp_path / "tiny.toml"
    job.write_text(tiny_job_toml(*DATA_PARALLEL, "parallel.mode=local", text=tmp_path / "tiny.txt"))
    done = run_mpiexec(2, [sys.executable, "-m", "disttrain.cli.main", "run", job, "--out", tmp_path / "out"])
    assert done.returncode == 2
    assert done.stderr.count('mode = "local" but 2 processes were launched') == 1     # said once, by rank 0


SETUP_JOB = """
[model]
factory = "user_models:{model}"
hidden = 8
layers = 1
[data]
factory = "user_models:{data}"
batch_size = 24
[parallel]
mode = "data"
timeout_s = 600
[train]
max_steps = 2
"""


@pytest.mark.parametrize("model, data, status, said", [
    ("classifier", "blobs_crash_on_rank_1", 1, "disttrain run: error: rank 1: RuntimeError: rank 1 cannot read its data"),
    ("classifier", "blobs_missing_on_rank_1", 2,
     "disttrain run: error: rank 1: [data] factory: no data on rank 1's host"),
    ("classifier_crash_on_rank_1", "blobs", 1, "[rank 1 of 2] failed; aborting the job"),
])
def test_a_rank_failing_before_training_stops_every_rank_at_once(tmp_path, model, data, status, said):
    """Not after [parallel] timeout_s (600 s here, past the run's own time-out, which a wait would hit)."""
    job = tmp_path / "setup.toml"
    job.write_text(SETUP_JOB.format(model=model, data=data))
    done = run_mpiexec(2, [sys.executable, "-m", "disttrain.cli.main", "run", job, "--out", tmp_path / "out"],
                       timeout=120, PYTHONPATH=str(HERE))
    assert done.returncode == status, done.stderr
    assert done.stderr.count(said) == 1, done.stderr
    assert "watchdog" not in done.stderr


@pytest.mark.parametrize("rank_1_sets, said", [
    ("data.path={missing}", "disttrain run: error: rank 1: "),                  # its data file is not on its host
    ("optim.lr=abc", "disttrain run: error: rank 1: "),                         # its job differs and is wrong
])
def test_a_rank_whose_own_checks_fail_stops_every_rank_at_once(tmp_path, rank_1_sets, said):
    """Rank 0 goes on to its checks of the output directory and the memory (an LSTM job): no check may wait for
    rank 1, which stopped at its first; the outcomes meet in one exchange after them all."""
    (tmp_path / "tiny.txt").write_text(text())
    job = tmp_path / "tiny.toml"
    job.write_text(tiny_job_toml(*DATA_PARALLEL, "parallel.timeout_s=600", text=tmp_path / "tiny.txt"))
    cli = [sys.executable, "-m", "disttrain.cli.main", "run", job, "--out", tmp_path / "out"]
    rank_1 = ["--set", rank_1_sets.format(missing=tmp_path / "not-here.txt")]
    done = run_mpiexec(1, [*cli, ":", "-n", "1", *cli, *rank_1], timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count(said) == 1 and "watchdog" not in done.stderr, done.stderr


def test_ranks_given_different_jobs_are_refused_naming_the_keys(tmp_path):
    (tmp_path / "tiny.txt").write_text(text())
    job = tmp_path / "tiny.toml"
    job.write_text(tiny_job_toml(*DATA_PARALLEL, text=tmp_path / "tiny.txt"))
    cli = [sys.executable, "-m", "disttrain.cli.main", "run", job, "--out", tmp_path / "out"]
    done = run_mpiexec(1, [*cli, ":", "-n", "1", *cli, "--set", "optim.lr=0.5", "--set", "train.max_steps=9"],
                       timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("disttrain run: error: rank 1: its job differs from rank 0's: [optim] lr = 0.5 "
                             "(rank 0: ") == 1, done.stderr
    assert "[train] max_steps = 9 (rank 0: 6)" in done.stderr
