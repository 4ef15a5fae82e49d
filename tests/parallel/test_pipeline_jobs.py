"""Pipeline jobs launched with mpiexec as subprocesses: `disttrain run` equals one process, its checkpoint
loads in `disttrain eval`, the trace shows every stage's spans, and errors end every rank (timeouts guard)."""
import json
import sys
import time

import pytest

from parallel_testing import HERE, needs_mpiexec, run_mpiexec
from tiny_jobs import DATA_PARALLEL, tiny_job_toml

pytestmark = [needs_mpiexec, pytest.mark.mpi_skip]

# the data-parallel tiny job (a 1-layer char LSTM: 3 blocks) as a 2-stage pipeline
PIPELINE = (*DATA_PARALLEL, "parallel.mode=pipeline", "parallel.stages=2", "parallel.micro_batches=2")


@pytest.fixture
def job(tmp_path, make_text):
    (tmp_path / "tiny.txt").write_text(make_text(2400))

    def write(steps=6, name="tiny.toml"):
        path = tmp_path / name
        path.write_text(tiny_job_toml(*PIPELINE, f"train.max_steps={steps}", text=tmp_path / "tiny.txt"))
        return path
    return write


def rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_pipeline_run_equals_one_process_and_its_checkpoint_evaluates(tmp_path, job):
    cli = [sys.executable, "-m", "disttrain.cli.main"]
    path = job()
    done = run_mpiexec(2, [*cli, "run", path, "--out", tmp_path / "pp", "--trace", tmp_path / "pp.json"], timeout=120)
    assert done.returncode == 0, done.stderr
    local = run_mpiexec(1, [*cli, "run", path, "--set", "parallel.mode=local", "--out", tmp_path / "local"],
                        timeout=120)
    assert local.returncode == 0, local.stderr
    got, want = rows(tmp_path / "pp"), rows(tmp_path / "local")
    assert [(r["step"], r["split"]) for r in got] == [(r["step"], r["split"]) for r in want] and len(got) >= 5
    for a, b in zip(got, want):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    # rank 0 wrote the whole model: the local `disttrain eval` reads it and finds the same perplexities
    evaluated = run_mpiexec(1, [*cli, "eval", path, "--checkpoint", tmp_path / "pp"], timeout=120)
    assert evaluated.returncode == 0, evaluated.stderr
    final = [line for line in done.stdout.splitlines() if line.startswith("final:")][0]
    assert final in evaluated.stdout
    spans = [e for e in json.loads((tmp_path / "pp.json").read_text())["traceEvents"] if e["ph"] == "X"]
    names = {(e["pid"], e["name"]) for e in spans}
    assert {(0, "forward"), (0, "backward"), (0, "send activation"), (0, "recv gradient")} <= names
    assert {(1, "forward"), (1, "backward"), (1, "recv activation"), (1, "send gradient")} <= names


def test_a_failing_stage_ends_the_job(tmp_path, job):
    start = time.monotonic()
    done = run_mpiexec(2, [sys.executable, HERE / "mpi_scripts" / "pipeline_stage_fails.py", job(steps=1000),
                           tmp_path / "out"], timeout=90)
    assert done.returncode != 0
    assert time.monotonic() - start < 60
    assert "[rank 1 of 2] failed; aborting the job" in done.stderr and "injected failure" in done.stderr


def test_world_size_not_a_multiple_of_stages_is_refused(tmp_path, job):
    path = job()
    done = run_mpiexec(3, [sys.executable, "-m", "disttrain.cli.main", "run", path, "--out", tmp_path / "out"],
                       timeout=60)
    assert done.returncode == 2
    assert "[parallel] stages = 2 but 3 processes were launched" in done.stderr
    assert str(path) in done.stderr


def test_more_stages_than_blocks_is_one_line_naming_the_blocks(tmp_path, job):
    done = run_mpiexec(4, [sys.executable, "-m", "disttrain.cli.main", "run", job(), "--set", "parallel.stages=4",
                           "--out", tmp_path / "out"], timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("[parallel] stages = 4, but the model has 3 blocks (embedding, lstm.l0, decoder) and "
                             "every stage needs at least one; choose at most 3 stages") == 1, done.stderr
    assert "Traceback" not in done.stderr
