"""`disttrain run` under mpiexec: mistakes are said once with exit status 2; the start says what the run is;
traces label evaluation and keep a window of steps."""
import json
import re
import sys

import pytest

from parallel_testing import needs_mpiexec, run_mpiexec, text
from tiny_jobs import DATA_PARALLEL, tiny_job_toml

pytestmark = [needs_mpiexec, pytest.mark.mpi_skip]

PIPELINE = ["--set", "parallel.mode=pipeline", "--set", "parallel.micro_batches=2"]


@pytest.fixture
def job(tmp_path):
    (tmp_path / "tiny.txt").write_text(text())
    path = tmp_path / "tiny.toml"
    path.write_text(tiny_job_toml(*DATA_PARALLEL, text=tmp_path / "tiny.txt"))
    return path


def run(ranks, job, *options, timeout=120):
    return run_mpiexec(ranks, [sys.executable, "-m", "disttrain.cli.main", "run", job, *options], timeout=timeout)


@pytest.mark.parametrize("ranks, options, message", [
    (3, (), "[data] batch_size = 4 does not divide among the 3 ranks launched"),
    (2, (*PIPELINE, "--set", 'parallel.split_points=["nope"]'),
     '[parallel] split_points = ["nope"] with stages = 2: no block named \'nope\''),
    (2, ("--set", "model.hidden=100000"), "the job needs about"),
    (2, ("--set", "data.batch_size=4000"), "[data] batch_size = 4000 is larger than the data allows"),
    (2, ("--out", "{tmp}/tiny.txt/run"), "tiny.txt is a file, not a directory"),
])
def test_a_mistake_is_said_once_with_exit_2(job, tmp_path, ranks, options, message):
    options = [o.format(tmp=tmp_path) for o in options]
    if "--out" not in options:
        options += ["--out", str(tmp_path / "out")]
    done = run(ranks, job, *options)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count(message) == 1, done.stderr
    assert done.stderr.count("disttrain run: error:") == 1
    assert "Traceback" not in done.stderr and "BAD TERMINATION" not in done.stdout + done.stderr


def test_the_start_says_what_the_run_is(job, tmp_path):
    local = run(1, job, "--set", "parallel.mode=local", "--out", tmp_path / "local")
    assert local.returncode == 0, local.stderr
    parameters = re.search(r"([\d,]+) parameters", local.stdout).group(1)
    assert "local: 1 process, 4 streams a batch, 1 BLAS thread" in local.stdout

    data = run(2, job, "--out", tmp_path / "data")
    assert data.returncode == 0, data.stderr
    assert ("data parallel: 2 ranks (2 on this node), 2 of the batch's 4 streams per rank, 1 BLAS thread per rank; "
            "a rank waits at most 300 s for the others ([parallel] timeout_s)") in data.stdout

    pipe = run(2, job, *PIPELINE, "--set", 'parallel.split_points=["decoder"]', "--out", tmp_path / "pipe")
    assert pipe.returncode == 0, pipe.stderr
    assert f"{parameters} parameters" in pipe.stdout                 # the whole model's, not stage 0's
    assert ("pipeline: 2 ranks (2 on this node) = 2 stages x 1 replica, 4 of the batch's 4 streams per replica in "
            "2 micro-batches of 2, schedule 1f1b, 1 BLAS thread per rank") in pipe.stdout
    assert "2 stages over 3 blocks, chosen by split_points" in pipe.stdout
    rows = [line.split() for line in pipe.stdout.splitlines() if re.match(r"^[01] ", line)]
    stage_params = [int(row[row.index("-") + 2].replace(",", "")) for row in rows]
    assert len(stage_params) == 2 and sum(stage_params) == int(parameters.replace(",", ""))


def test_trace_labels_evaluation_and_keeps_a_window_of_steps(job, tmp_path):
    trace = tmp_path / "pipe.trace.json"
    done = run(2, job, *PIPELINE, "--out", tmp_path / "out", "--trace", trace, "--trace-steps", "2:3")
    assert done.returncode == 0, done.stderr
    spans = [e for e in json.loads(trace.read_text())["traceEvents"] if e["ph"] == "X"]
    steps = [e for e in spans if e["cat"] == "steps"]
    assert sorted({e["name"] for e in steps}) == ["step 2", "step 3"] and {e["pid"] for e in steps} == {0, 1}
    evals = [e for e in spans if e["name"] == "eval valid"]
    assert len(evals) == 2                              # after step 3, on both ranks; none after step 6
    for e in spans:                                     # everything else lies inside steps 2..3 of its rank
        if e not in steps:
            assert any(s["pid"] == e["pid"] and s["ts"] <= e["ts"] and e["ts"] + e["dur"] <= s["ts"] + s["dur"] + 1
                       for s in steps), e
    inside = [e for e in spans if any(v["pid"] == e["pid"] and v["ts"] <= e["ts"] < v["ts"] + v["dur"]
                                      for v in evals) and e not in evals and e not in steps]
    assert inside and all(e["name"].startswith("eval valid: ") for e in inside)
    assert {"eval valid: forward", "eval valid: broadcast loss"} <= {e["name"] for e in inside}


def test_eval_under_mpiexec_is_refused_once_instead_of_run_on_every_rank(job, tmp_path):
    done = run_mpiexec(2, [sys.executable, "-m", "disttrain.cli.main", "eval", job, "--checkpoint", tmp_path],
                       timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("disttrain eval: error: disttrain eval runs in one process; 2 were launched") == 1
