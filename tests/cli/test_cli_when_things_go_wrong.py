"""`disttrain run` / `eval` when things go wrong (README "When things go wrong"): running a job again into the
same directory, a damaged checkpoint, resuming with a new lr, a diverging run."""
import json
import re

import pytest

from cli_testing import metric_rows
from disttrain.cli.main import main


def run_args(job_file, text_file, out, *sets):
    args = ["run", str(job_file), "--set", "data.kind=chars", "--set", f"data.path={text_file}",
            "--set", "train.log_every=1", "--out", str(out)]
    for item in sets:
        args += ["--set", item]
    return args


def listing(out):
    return sorted(p.name for p in (out / "checkpoints").iterdir())


def test_running_a_job_again_refuses_until_told_to_resume_or_overwrite(job_file, text_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(run_args(job_file, text_file, out, "train.max_steps=6", "train.checkpoint_every=2")) == 0
    before = {name: (out / name).read_bytes() for name in ("metrics.jsonl", "curves.png", "config.toml")}
    capsys.readouterr()

    assert main(run_args(job_file, text_file, out, "train.max_steps=6")) == 2
    err = capsys.readouterr().err
    assert err == (f"disttrain run: error: {out} holds an earlier run (2 checkpoint(s), the newest of step 6): "
                   f"continue it with --resume, or start over with --overwrite (deletes its checkpoints, "
                   f"metrics.jsonl and curves.png)\n")
    assert listing(out) == ["step-000004", "step-000006"]                 # nothing touched
    assert before == {name: (out / name).read_bytes() for name in before}

    with pytest.raises(SystemExit) as exited:
        main(run_args(job_file, text_file, out) + ["--resume", "--overwrite"])
    assert exited.value.code == 2 and "not allowed with argument" in capsys.readouterr().err

    assert main(run_args(job_file, text_file, out, "train.max_steps=3", "train.checkpoint_every=2")
                + ["--overwrite"]) == 0
    assert listing(out) == ["step-000002", "step-000003"]                 # the old run's checkpoints are gone
    assert [r["step"] for r in metric_rows(out) if r["split"] == "train"] == [1, 2, 3]


def test_a_run_that_stopped_before_its_first_checkpoint_is_not_replaced_either(job_file, text_file, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "split": "train", "loss": 3.0}\n')
    assert main(run_args(job_file, text_file, out, "train.max_steps=2")) == 2
    assert capsys.readouterr().err == (f"disttrain run: error: {out} holds an earlier run's metrics.jsonl but no "
                                       f"checkpoint to resume from: start over with --overwrite (deletes it and "
                                       f"curves.png), or choose another --out\n")
    assert main(run_args(job_file, text_file, out, "train.max_steps=2") + ["--resume"]) == 2    # says the same
    assert capsys.readouterr().err.endswith("its run stopped before its first checkpoint; start it over with "
                                            "--overwrite\n")
    assert main(run_args(job_file, text_file, out, "train.max_steps=2") + ["--overwrite"]) == 0


def test_a_damaged_checkpoint_is_named_and_resume_falls_back_to_the_previous_one(job_file, text_file, tmp_path,
                                                                                  capsys):
    assert main(run_args(job_file, text_file, tmp_path / "whole", "train.max_steps=12",
                         "train.checkpoint_every=4")) == 0
    out = tmp_path / "run"
    assert main(run_args(job_file, text_file, out, "train.max_steps=8", "train.checkpoint_every=4")) == 0
    weights = out / "checkpoints" / "step-000008" / "model.safetensors"
    with open(weights, "r+b") as fh:                                     # 400 bytes of weights overwritten
        fh.seek(weights.stat().st_size - 1000)
        fh.write(bytes(range(200)) * 2)
    capsys.readouterr()

    fallback = (f"checkpoint {weights.parent} is unusable: {weights}: sha256 ")
    assert main(["eval", str(job_file), "--set", "data.kind=chars", "--set", f"data.path={text_file}",
                 "--checkpoint", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.err.startswith(f"disttrain eval: {fallback}") and "step 4," in captured.out
    assert captured.err.rstrip().endswith(f"using {out / 'checkpoints' / 'step-000004'} instead")
    assert main(["eval", str(job_file), "--set", "data.kind=chars", "--set", f"data.path={text_file}",
                 "--checkpoint", str(weights.parent)]) == 2
    assert re.search(r"model.safetensors: sha256 \w+\.\.\. differs from the manifest's", capsys.readouterr().err)
    assert main(["eval", str(job_file), "--set", "data.kind=chars", "--set", f"data.path={text_file}",
                 "--checkpoint", str(out / "checkpoints" / "step-000004")]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and f"checkpoint {out / 'checkpoints' / 'step-000004'} (step 4," in captured.out

    assert main(run_args(job_file, text_file, out, "train.max_steps=12", "train.checkpoint_every=4")
                + ["--resume"]) == 0
    captured = capsys.readouterr()
    assert f"disttrain run: {fallback}" in captured.err and "resuming at step 4" in captured.out
    assert metric_rows(out) == metric_rows(tmp_path / "whole")            # as if nothing had happened
    assert listing(out) == ["step-000008", "step-000012"]


def test_resume_applies_a_new_lr_and_refuses_other_changes(job_file, text_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(run_args(job_file, text_file, out, "train.max_steps=5")) == 0
    capsys.readouterr()
    assert main(run_args(job_file, text_file, out, "train.max_steps=8", "optim.lr=0.001") + ["--resume"]) == 0
    err = capsys.readouterr().err
    assert ("disttrain run: resumed with [optim] lr = 0.001 (the checkpoint's job: 0.01); the lr in use goes from "
            "0.01 to 0.001") in err
    assert "disttrain run: resumed with [train] max_steps = 8 (the checkpoint's job: 5)" in err
    lrs = [(r["step"], r["lr"]) for r in metric_rows(out) if r["split"] == "train"]
    assert lrs == [(s, 0.01) for s in range(1, 6)] + [(s, pytest.approx(0.001, rel=1e-12)) for s in range(6, 9)]
    assert "lr = 0.001" in (out / "config.toml").read_text()

    assert main(run_args(job_file, text_file, out, "train.max_steps=9", "optim.lr=0.001", "optim.kind=sgd")
                + ["--resume"]) == 2
    assert ("was written for a different job; [optim] kind: checkpoint 'adam', job 'sgd' (a resumed run may change "
            "only: [optim] lr, clip_norm;") in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")      # what diverging looks like
def test_a_diverging_run_stops_with_exit_3_naming_step_value_and_last_checkpoint(job_file, text_file, tmp_path,
                                                                                  capsys):
    out = tmp_path / "run"
    status = main(run_args(job_file, text_file, out, "train.max_steps=60", "train.checkpoint_every=1",
                           "optim.lr=1e37"))
    err = capsys.readouterr().err
    assert status == 3, err
    match = re.search(r"disttrain run: step (\d+): loss (\S+), gradient norm (\S+): not finite; stopped "
                      r'\(\[train\] on_nonfinite = "stop"\); the last good checkpoint is (\S+)\n', err)
    assert match, err
    step = int(match.group(1))
    assert "nan" in match.group(2) + match.group(3) or "inf" in match.group(2) + match.group(3)
    assert match.group(4) == str(out / "checkpoints" / f"step-{step - 1:06d}")
    assert "continue from that checkpoint with --resume and a lower --set optim.lr=" in err
    assert not list((out / "checkpoints").glob("*.tmp"))
    text = (out / "metrics.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text.splitlines()[-1])["step"] == step


def test_a_step_over_the_memory_budget_stops_with_exit_2_and_is_said_once(job_file, text_file, tmp_path, capsys):
    status = main(run_args(job_file, text_file, tmp_path / "run", "train.max_steps=3", "memory.budget_mb=0.001"))
    err = capsys.readouterr().err
    assert status == 2, err        # the same job would exceed it again: `disttrain launch` does not restart it
    assert err.count("disttrain run: step 1 peaked at ") == 1, err
    assert "over [memory] budget_mb = 0.001" in err
