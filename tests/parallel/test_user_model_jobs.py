"""A user's own model and data, named by `[model] factory` / `[data] factory` (tests/parallel/user_models.py on
PYTHONPATH), train through `disttrain run` in local, data and pipeline mode with the same numbers, resume, and
get metrics and curves, without a line of training loop."""
import json
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

from parallel_testing import HERE, needs_mpiexec, run_mpiexec

pytestmark = [needs_mpiexec, pytest.mark.mpi_skip]

JOB = """
[model]
factory = "user_models:classifier"
hidden = 16
layers = 2
[data]
factory = "user_models:blobs"
batch_size = 24
[optim]
kind = "sgd"
lr = 0.2
momentum = 0.9
[train]
epochs = 3
log_every = 5
checkpoint_every = 20
seed = 4
"""


def run(tmp_path, ranks, out, *overrides, options=()):
    job = tmp_path / "user.toml"
    job.write_text(JOB)
    args = ["-m", "disttrain.cli.main", "run", job, "--out", out, *options]
    for override in overrides:
        args += ["--set", override]
    done = run_mpiexec(ranks, [sys.executable, *args], timeout=240, PYTHONPATH=str(HERE))
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def final_weights(run_dir):
    newest = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
    return load_file(newest / "model.safetensors")


def rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_factory_model_trains_in_local_data_and_pipeline_mode_alike(tmp_path):
    local = run(tmp_path, 1, tmp_path / "local")
    assert "model from user_models:classifier" in local.stdout and "final: valid loss" in local.stdout
    metrics = rows(tmp_path / "local")
    train = [r for r in metrics if r["split"] == "train"]
    valid = [r for r in metrics if r["split"] == "valid"]
    assert "examples_per_s" in train[0] and "ppl" not in train[0] and (tmp_path / "local" / "curves.png").exists()
    assert valid[-1]["loss"] < 0.5 * valid[0]["loss"] or valid[-1]["loss"] < 0.3      # it learns the blobs
    want = final_weights(tmp_path / "local")
    for mode, extra in (("data", []), ("pipeline", ["parallel.stages=2", "parallel.micro_batches=2"])):
        run(tmp_path, 2, tmp_path / mode, f"parallel.mode={mode}", *extra)
        got = final_weights(tmp_path / mode)
        assert got.keys() == want.keys()
        for name in want:
            np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-5, err_msg=f"{mode}: {name}")


def test_a_factory_run_resumes_where_it_stopped(tmp_path):
    run(tmp_path, 1, tmp_path / "whole")
    run(tmp_path, 1, tmp_path / "part", "train.epochs=1")
    run(tmp_path, 2, tmp_path / "part", "parallel.mode=data", options=["--resume"])
    got, want = final_weights(tmp_path / "part"), final_weights(tmp_path / "whole")
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-5, err_msg=name)


def test_a_model_that_does_not_fit_its_data_is_one_line_and_exit_2(tmp_path):
    job = tmp_path / "user.toml"
    job.write_text(JOB.replace("user_models:classifier", "user_models:classifier_of_wrong_width"))
    done = run_mpiexec(1, [sys.executable, "-m", "disttrain.cli.main", "run", job, "--out", tmp_path / "out"],
                       timeout=120, PYTHONPATH=str(HERE))
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("disttrain run: error: ") and "Traceback" not in done.stderr, done.stderr
    assert "(24, 2)" in done.stderr and "3" in done.stderr


@pytest.mark.parametrize("model, extra, said", [
    ("not_a_chain", (), '[parallel] mode = "pipeline" cuts the model into blocks, but a _TwoLayers is neither an nn.Sequential '
                        "nor defines pipeline_blocks(); make it an nn.Sequential, or give it pipeline_blocks()"),
    ("tied_ends", (), "[parallel] stages = 2: no cut into 2 stages keeps every stage starting where one may: not at "
                      "block 'last': parameter 'first.0.weight' of block 'first' is 'last.1.weight' of block 'last' "
                      "too; tied weights must stay in one stage; choose at most 1 stages"),
    ("pair_in_the_middle", ('parallel.split_points=["3"]',),
     "[parallel] split_points = [\"3\"] with stages = 2: block '2' returns a tuple and ends a pipeline stage, but "
     "stages exchange one Tensor; choose split_points after blocks that return one Tensor"),
    ("classifier_then_tanh", ('parallel.split_points=["5"]',),      # only rank 1 holds it: all must stop alike
     "pipeline stage 1 of 2 holds no parameters (blocks 5); choose fewer stages, or split points that give every "
     "stage a block with parameters"),
])
def test_a_model_pipeline_mode_cannot_cut_is_one_line_and_exit_2(tmp_path, model, extra, said):
    job = tmp_path / "user.toml"
    job.write_text(JOB.replace("user_models:classifier", f"user_models:{model}"))
    args = [sys.executable, "-m", "disttrain.cli.main", "run", job, "--out", tmp_path / "out", "--set",
            "parallel.mode=pipeline", "--set", "parallel.stages=2"]
    for override in extra:
        args += ["--set", override]
    done = run_mpiexec(2, args, timeout=120, PYTHONPATH=str(HERE))
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.startswith(f"disttrain run: error: {job}: {said}") and done.stderr.count("\n") == 1, done.stderr
