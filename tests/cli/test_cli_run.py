"""`disttrain run` and `disttrain eval` end to end on tiny data, and how they report bad job files."""
import json
import math
import os
import re
import signal
import subprocess

import pytest

from cli_testing import disttrain_cmd, metric_rows, run_disttrain
from disttrain.cli.main import main

def chars(text_file):
    return ["--set", "data.kind=chars", "--set", f"data.path={text_file}"]


def test_run_writes_all_outputs_and_eval_reproduces_them(job_file, text_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["run", str(job_file), *chars(text_file), "--set", "train.max_steps=30", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert {p.name for p in out.iterdir()} == {"metrics.jsonl", "config.toml", "checkpoints", "curves.png", "memory.json",
                                               ".lock"}                  # the lock file stays (train/run_lock.py)
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config = (out / "config.toml").read_text()
    assert 'kind = "chars"' in config and "max_steps = 30" in config
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == [5, 10, 15, 20, 25, 30]
    assert [(r["step"], r["split"]) for r in rows if r["split"] != "train"] == [(20, "valid"), (30, "valid"),
                                                                                (30, "test")]
    for r in rows:
        assert {"step", "epoch", "split", "loss", "ppl", "tokens_per_s", "bpc", "time"} <= set(r)
        assert r["ppl"] == pytest.approx(math.exp(r["loss"])) and r["bpc"] == pytest.approx(r["loss"] / math.log(2))
    assert {"lr", "grad_norm"} <= set(rows[0])
    valid, test = rows[-2], rows[-1]
    assert f"valid ppl {valid['ppl']:.3f} | test ppl {test['ppl']:.3f}" in printed
    assert f"valid bpc {valid['bpc']:.4f} | test bpc {test['bpc']:.4f}" in printed
    assert "step 30/30 | epoch 1 | loss" in printed                      # plain log lines: stdout is no tty

    # evaluation needs the weights only: another optimizer in the job is fine
    assert main(["eval", str(job_file), *chars(text_file), "--set", "optim.kind=sgd", "--checkpoint", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "step 30" in printed
    assert f"valid ppl {valid['ppl']:.3f} | test ppl {test['ppl']:.3f}" in printed


def test_default_output_dir_is_runs_job_name(job_file, text_file, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["run", str(job_file), *chars(text_file), "--set", "train.max_steps=3"]) == 0
    assert (tmp_path / "runs" / "tiny" / "checkpoints" / "step-000003" / "model.safetensors").is_file()
    assert "outputs in runs/tiny/" in capsys.readouterr().out


def test_default_corpus_job_runs(job_file, tmp_path, capsys):
    assert main(["run", str(job_file), "--set", "train.max_steps=4", "--out", str(tmp_path / "o")]) == 0
    assert "test bpc" in capsys.readouterr().out


@pytest.mark.parametrize("body, override, expected", [
    ("[model]\nhiden = 3\n", (), r'job.toml: \[model\] unknown key "hiden" \(did you mean "hidden"\?\)'),
    ("[optim]\nlr = \"fast\"\n", (), r'job.toml: \[optim\] lr = "fast": expected a float > 0'),
    ("[train]\nepochs = 1.5\n", (), r"job.toml: \[train\] epochs = 1.5: expected an int > 0"),
    ("", ("--set", "optim.lr=-1"), r"job.toml: override \"optim.lr=-1\": \[optim\] lr = -1: expected a float > 0"),
    ('[data]\nkind = "ptb"\npath = "no/such/ptb"\n', (),
     r'job.toml: \[data\] path = "no/such/ptb" \(resolved to .*\): does not exist; expected a directory holding '
     r"ptb.train.txt"),
    ('[data]\nkind = "chars"\n', (), r'job.toml: \[data\] path is missing: expected a path \(required when'),
])
def test_bad_job_files_exit_2_naming_file_and_key(tmp_path, capsys, body, override, expected):
    job = tmp_path / "job.toml"
    job.write_text(body)
    assert main(["run", str(job), *override, "--out", str(tmp_path / "o")]) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    assert captured.err.startswith("disttrain run: error: ")
    assert re.search(expected, captured.err), captured.err
    assert not (tmp_path / "o").exists()


def test_bad_job_as_a_process_prints_no_traceback(tmp_path):
    job = tmp_path / "bad.toml"
    job.write_text("[model]\nhidden = 0\n")
    done = run_disttrain("run", job, "--out", tmp_path / "o")
    assert done.returncode == 2
    assert "bad.toml: [model] hidden = 0: expected an int > 0" in done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""


def test_resume_and_eval_without_a_checkpoint_exit_2(job_file, tmp_path, capsys):
    assert main(["run", str(job_file), "--resume", "--out", str(tmp_path / "none")]) == 2
    assert "--resume: no checkpoint in" in capsys.readouterr().err
    assert main(["eval", str(job_file), "--checkpoint", str(tmp_path / "none")]) == 2
    assert "no checkpoint in" in capsys.readouterr().err


def test_eval_refuses_a_checkpoint_of_another_model(job_file, text_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["run", str(job_file), *chars(text_file), "--set", "train.max_steps=2", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["eval", str(job_file), *chars(text_file), "--set", "model.hidden=8", "--checkpoint", str(out)]) == 2
    assert r"[model] hidden: checkpoint 16, job 8" in capsys.readouterr().err


def test_cli_resume_continues_where_it_stopped(job_file, text_file, tmp_path, capsys):
    common = [str(job_file), *chars(text_file), "--set", "train.log_every=1"]
    assert main(["run", *common, "--set", "train.max_steps=40", "--out", str(tmp_path / "whole")]) == 0
    assert main(["run", *common, "--set", "train.max_steps=17", "--out", str(tmp_path / "run")]) == 0
    assert main(["run", *common, "--set", "train.max_steps=40", "--out", str(tmp_path / "run"), "--resume"]) == 0
    assert "resuming at step 17" in capsys.readouterr().out
    whole = [r for r in metric_rows(tmp_path / "whole") if r["split"] == "train"]
    resumed = [r for r in metric_rows(tmp_path / "run") if r["split"] == "train"]
    assert [r["step"] for r in resumed] == list(range(1, 41))
    assert resumed == whole


def test_cuda_without_a_gpu_is_a_clear_error(job_file, tmp_path, capsys):
    import disttrain as dt

    if dt.cuda_available():
        pytest.skip("a GPU is present")
    assert main(["run", str(job_file), "--device", "cuda", "--out", str(tmp_path / "o")]) == 2
    assert "error: --device cuda: device 'cuda' is not available" in capsys.readouterr().err     # the flag's
    assert main(["run", str(job_file), "--set", "train.device=cuda", "--out", str(tmp_path / "o")]) == 2
    assert 'tiny.toml: [train] device = "cuda": device \'cuda\' is not available' in capsys.readouterr().err


def test_a_reader_that_leaves_ends_the_run_quietly_as_sigpipe_would(job_file, text_file, tmp_path):
    """`disttrain run JOB | head -1`: no traceback once the pipe closes; the exit status says SIGPIPE."""
    cmd = disttrain_cmd("run", job_file, *chars(text_file), "--set", "train.max_steps=400", "--set",
                        "train.log_every=1", "--out", tmp_path / "run")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    proc.stdout.readline()
    proc.stdout.close()                                          # what `head -1` does after its line
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 128 + signal.SIGPIPE, err
    assert "Traceback" not in err and "BrokenPipeError" not in err


@pytest.mark.parametrize("limit, said", [((), "already trained its 1 epoch"),
                                         (("--set", "train.max_steps=6"), "already trained its max_steps = 6")])
def test_resuming_a_finished_run_says_that_nothing_is_left_to_train(job_file, text_file, tmp_path, capsys, limit,
                                                                    said):
    common = [str(job_file), *chars(text_file), *limit, "--out", str(tmp_path / "run")]
    assert main(["run", *common]) == 0
    before = metric_rows(tmp_path / "run")
    capsys.readouterr()
    assert main(["run", *common, "--resume"]) == 0
    out = capsys.readouterr().out
    assert f"{said}: nothing is left to train, so it only reports its results" in out
    assert "epoch 2" not in out and "final: valid ppl" in out
    assert metric_rows(tmp_path / "run") == before
