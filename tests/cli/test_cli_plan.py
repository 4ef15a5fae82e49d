"""`disttrain plan JOB [--ranks N] [--budget-mb X] [--set ...]`: each rank's memory estimate without training,
the same figures `disttrain run` writes to memory.json; exit status 2 and one line when it does not fit."""
import json
from pathlib import Path

import pytest

from cli_testing import run_disttrain
from disttrain.cli.main import main
from disttrain.train.memory_plan import format_bytes

FIGURES = ("parameters", "gradients", "optimizer state", "activations", "predicted peak")


def one_error_line(capsys):
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("disttrain plan: error: "), err
    return lines[0]


def figures(out, heading):
    """{figure: text} of the block under the line starting with `heading`."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(heading))
    return {line[2:18].strip(): line[18:].strip() for line in lines[start + 1:start + 1 + len(FIGURES)]}


def test_plan_prints_what_run_writes_to_memory_json(job_file, tmp_path):
    """Local mode: `plan` prints the figures of the memory.json that `run` of the same job writes."""
    planned = run_disttrain("plan", job_file)
    assert planned.returncode == 0, planned.stderr
    assert "activations per block (one micro-batch, each block on its own): embedding " in planned.stdout
    ran = run_disttrain("run", job_file, "--set", "train.max_steps=2", "--out", tmp_path / "run")
    assert ran.returncode == 0, ran.stderr
    memory = json.loads((tmp_path / "run" / "memory.json").read_text())
    assert set(memory) == {"params_bytes", "grads_bytes", "optimizer_state_bytes", "activation_bytes",
                           "predicted_peak_bytes", "measured_peak_bytes"}
    keys = ("params_bytes", "grads_bytes", "optimizer_state_bytes", "activation_bytes", "predicted_peak_bytes")
    expected = {name: format_bytes(memory[key]) for name, key in zip(FIGURES, keys)}
    assert figures(planned.stdout, "memory of the process (local)") == expected
    assert figures(ran.stdout, "memory per process (local)") == expected


def test_data_ranks_with_zero_stage_one_hold_a_share_of_the_optimizer_state(job_file, capsys):
    assert main(["plan", str(job_file), "--set", "parallel.mode=data", "--ranks", "2"]) == 0
    plain = figures(capsys.readouterr().out, "memory of each data-parallel rank (2 ranks)")
    assert main(["plan", str(job_file), "--set", "parallel.mode=data", "--set", "parallel.shard_optimizer=1",
                 "--ranks", "2"]) == 0
    sharded = figures(capsys.readouterr().out, "memory of each data-parallel rank (2 ranks, ZeRO stage 1)")
    assert sharded["parameters"] == plain["parameters"] and sharded["gradients"] == plain["gradients"]
    assert sharded["optimizer state"] == plain["gradients"]       # Adam's two moments, halved
    assert plain["optimizer state"] != sharded["optimizer state"]


def test_pipeline_stages(job_file, capsys):
    assert main(["plan", str(job_file), "--set", "parallel.mode=pipeline", "--set", "parallel.micro_batches=2"]) == 0
    out = capsys.readouterr().out
    assert "memory of pipeline stage 0 (" in out and "memory of pipeline stage 1 (" in out
    assert "2 micro-batches in flight" in out                      # 1F1B: stage 0 of 2 keeps two


@pytest.mark.parametrize("where", ["--budget-mb", "[memory] budget_mb"])
def test_over_the_budget_is_one_line_naming_the_mib_needed(job_file, capsys, where):
    budget = ["--budget-mb", "0.05"] if where == "--budget-mb" else ["--set", "memory.budget_mb=0.05"]
    assert main(["plan", str(job_file), *budget]) == 2
    line = one_error_line(capsys)
    assert " MiB at its predicted peak, over " in line and f"{where} = 0.05" in line
    assert line.startswith("disttrain plan: error: the process needs ")


def test_ranks_a_local_job_cannot_use(job_file, capsys):
    assert main(["plan", str(job_file), "--ranks", "3"]) == 2
    assert '--ranks 3: ' in one_error_line(capsys)


def test_an_auto_job_is_planned_as_run_plans_it(job_file, capsys):
    """[memory] activation_checkpointing = "auto": `plan` first chooses the checkpointing plan for the budget, as
    `run` does, so a budget the plain step exceeds but the plan meets passes, and the plan is printed."""
    long_window = ["--set", "data.bptt=128", "--set", "data.batch_size=2", "--set", "model.hidden=32",
                   "--set", "memory.budget_mb=0.7"]
    assert main(["plan", str(job_file), *long_window]) == 2                       # "none": over the budget
    one_error_line(capsys)
    assert main(["plan", str(job_file), *long_window, "--set", "memory.activation_checkpointing=auto"]) == 0
    out = capsys.readouterr().out
    assert out.count("activation checkpointing for [memory] budget_mb = 0.7: auto: recompute ") == 1, out
    peak = figures(out, "memory of the process (local)")["predicted peak"]
    assert peak.endswith("KiB") or float(peak.split()[0]) <= 0.7, peak


@pytest.mark.parametrize("mode, ranks, said", [
    ("data", 3, "[data] batch_size = 4 does not divide among the 3 ranks of --ranks 3 (each trains on batch_size "
                "/ ranks streams); expected a multiple of 3, or --ranks 1, 2, 4"),
    ("pipeline", 3, "[parallel] stages = 2 does not fit --ranks 3; expected a world size that is a multiple of the "
                    "stages (--ranks 2 for one pipeline, --ranks 4 for two data-parallel replicas)"),
    ("ps", 3, "[data] batch_size = 4 cannot be shared by 3 workers (--ranks 3): it must be a multiple of --ranks"),
])
def test_ranks_the_job_cannot_run_on_are_one_line_naming_the_option(job_file, capsys, mode, ranks, said):
    """The checks `run` (under mpiexec) and ps-cluster make of the processes, worded for plan: it launches none."""
    assert main(["plan", str(job_file), "--set", f"parallel.mode={mode}", "--set", "data.batch_size=4",
                 "--ranks", str(ranks)]) == 2
    line = one_error_line(capsys)
    assert line == f"disttrain plan: error: {job_file}: {said}"
    assert "launched" not in line


@pytest.mark.parametrize("sets, said", [
    (("parallel.mode=pipeline", "parallel.stages=5"), "[parallel] stages = 5, but the model has 4 blocks (embedding, "
                                                      "lstm.l0, lstm.l1, decoder) and every stage needs at least one"),
    (("parallel.mode=pipeline", "parallel.stages=2", "parallel.split_points=[4]"),
     "[parallel] split_points = [4] with stages = 2: block index 4 out of range"),
])
def test_a_pipeline_the_model_cannot_be_cut_into_is_one_line_as_in_run(job_file, capsys, sets, said):
    args = ["plan", str(job_file), "--set", "data.batch_size=5", "--set", "parallel.micro_batches=1"]
    for item in sets:
        args += ["--set", item]
    assert main(args) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"disttrain plan: error: {job_file}: {said}"), line


def test_a_device_the_machine_lacks_and_a_budget_below_zero_are_refused_in_one_line(job_file, capsys):
    import disttrain as dt

    if not dt.cuda_available():
        assert main(["plan", str(job_file), "--set", "train.device=cuda"]) == 2
        assert 'device = "cuda": device \'cuda\' is not available' in one_error_line(capsys)
    with pytest.raises(SystemExit) as stop:
        main(["plan", str(job_file), "--budget-mb", "-3"])
    assert stop.value.code == 2 and "expected a number of MiB > 0, got '-3'" in capsys.readouterr().err


@pytest.mark.parametrize("model, said", [
    ("not_a_chain", '[parallel] mode = "pipeline" cuts the model into blocks, but a _TwoLayers is neither an '
                    "nn.Sequential nor defines pipeline_blocks(); make it an nn.Sequential, or give it pipeline_blocks()"),
    ("tied_ends", "[parallel] stages = 2: no cut into 2 stages keeps every stage starting where one may: not at block "
                  "'last': parameter 'first.0.weight' of block 'first' is 'last.1.weight' of block 'last' too; tied "
                  "weights must stay in one stage; choose at most 1 stages"),
])
def test_a_users_model_a_pipeline_cannot_cut_is_one_line_as_in_run(tmp_path, capsys, monkeypatch, model, said):
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "parallel"))     # user_models.py
    job = tmp_path / "user.toml"
    job.write_text(f'[model]\nfactory = "user_models:{model}"\nhidden = 8\n[data]\nfactory = "user_models:blobs"\n'
                   'batch_size = 8\n[parallel]\nmode = "pipeline"\nstages = 2\n')
    assert main(["plan", str(job)]) == 2
    assert one_error_line(capsys).startswith(f"disttrain plan: error: {job}: {said}")
