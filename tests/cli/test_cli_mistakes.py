"""User mistakes `disttrain run` and `eval` answer with exit status 2 and one line, before allocating anything."""
import sys

import pytest

from cli_testing import run_disttrain
from disttrain.cli.main import main

LAUNCHER_VARS = ("PMI_SIZE", "PMI_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK")


@pytest.fixture(autouse=True)
def not_under_mpiexec(monkeypatch):
    for name in LAUNCHER_VARS:
        monkeypatch.delenv(name, raising=False)


def one_error_line(capsys, command="run"):
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"disttrain {command}: error: "), err
    return lines[0]


def test_out_under_a_file(job_file, tmp_path, capsys):
    (tmp_path / "a_file").write_text("x")
    assert main(["run", str(job_file), "--out", str(tmp_path / "a_file" / "run")]) == 2
    assert f"{tmp_path / 'a_file'} is a file, not a directory" in one_error_line(capsys)


@pytest.mark.skipif(sys.platform != "linux", reason="/proc refuses new files on Linux")
def test_out_where_nothing_can_be_written(job_file, capsys):
    assert main(["run", str(job_file), "--out", "/proc/disttrain-run"]) == 2
    assert "--out /proc/disttrain-run: cannot write in /proc" in one_error_line(capsys)


def test_a_batch_larger_than_the_data(job_file, tmp_path, capsys):
    assert main(["run", str(job_file), "--set", "data.batch_size=4000", "--out", str(tmp_path / "o")]) == 2
    line = one_error_line(capsys)
    assert "[data] batch_size = 4000 is larger than the data allows: the train split has 3," in line
    assert "expected batch_size <= 1," in line
    assert not (tmp_path / "o").exists()


def test_a_model_too_large_for_memory_is_refused_before_allocating(job_file, tmp_path, capsys):
    assert main(["run", str(job_file), "--set", "model.hidden=100000", "--out", str(tmp_path / "o")]) == 2
    line = one_error_line(capsys)
    assert "the job needs about" in line and "TiB of memory, this machine has" in line
    assert "parameters 596.1 GiB" in line and "[model] hidden = 100000" in line


def test_a_transformer_too_large_for_memory_is_refused_before_allocating(tmp_path, capsys):
    job = tmp_path / "wide.toml"
    job.write_text('[model]\nkind = "transformer_lm"\nd_model = 65536\nheads = 1\n[data]\nmax_bytes = 3000\n'
                   'batch_size = 4\nbptt = 8\n')
    assert main(["run", str(job), "--out", str(tmp_path / "o")]) == 2
    line = one_error_line(capsys)
    assert "the job needs about" in line and "[model] d_model = 65536" in line
    assert not (tmp_path / "o").exists()


def test_a_data_path_the_corpus_does_not_read(job_file, tmp_path, capsys):
    assert main(["run", str(job_file), "--set", "data.path=corpus.txt", "--out", str(tmp_path / "o")]) == 2
    assert ('[data] path = "corpus.txt": [data] kind = "default_corpus" reads no file'
            in one_error_line(capsys))


def test_an_empty_job_file_is_refused_and_a_section_header_runs_every_default(tmp_path, capsys):
    empty = tmp_path / "empty.toml"
    empty.write_text("# nothing yet\n")
    assert main(["run", str(empty), "--out", str(tmp_path / "o")]) == 2
    assert "empty.toml: the job file is empty, so every key would take its default" in one_error_line(capsys)
    assert main(["eval", str(empty), "--checkpoint", str(tmp_path / "o")]) == 2
    assert "the job file is empty" in one_error_line(capsys, "eval")
    header = tmp_path / "defaults.toml"
    header.write_text("[train]\n")
    small = ["--set", "model.hidden=8", "--set", "data.max_bytes=3000", "--set", "train.max_steps=1"]
    assert main(["run", str(header), *small, "--out", str(tmp_path / "o")]) == 0


def test_data_mode_without_mpiexec(job_file, tmp_path, capsys):
    assert main(["run", str(job_file), "--set", "parallel.mode=data", "--out", str(tmp_path / "o")]) == 2
    line = one_error_line(capsys)
    assert '[parallel] mode = "data", but this is 1 process, not started by mpiexec' in line
    assert f"mpiexec -n 2 disttrain run {job_file} --set parallel.mode=data (or" in line   # the --set it came from


def test_a_parameter_server_job_given_to_run_points_to_ps_cluster(job_file, tmp_path, capsys):
    assert main(["run", str(job_file), "--set", "parallel.mode=ps", "--out", str(tmp_path / "o")]) == 2
    assert f"start it with `disttrain ps-cluster {job_file}`" in one_error_line(capsys)


def test_trace_steps_needs_a_trace_file(job_file, tmp_path, capsys):
    assert main(["run", str(job_file), "--trace-steps", "2:3", "--out", str(tmp_path / "o")]) == 2
    assert "--trace-steps 2:3: needs --trace FILE" in one_error_line(capsys)


def test_eval_numbers_epochs_from_1_as_the_training_log_does(job_file, tmp_path, capsys):
    small = ["--set", "data.max_bytes=1000", "--set", "train.log_every=1"]
    for name, extra in (("mid", ["--set", "train.max_steps=2"]), ("end", ["--set", "train.epochs=2"])):
        out = tmp_path / name
        assert main(["run", str(job_file), *small, *extra, "--out", str(out)]) == 0
        last = capsys.readouterr().out.splitlines()
        epoch = [line for line in last if line.startswith("test @ step")][-1].split(" | ")[1]
        assert main(["eval", str(job_file), *small, "--checkpoint", str(out)]) == 0
        said = capsys.readouterr().out.splitlines()[0]
        assert said.endswith(f", {epoch})") and epoch == ("epoch 1" if name == "mid" else "epoch 2"), said


def test_eval_reads_parameter_server_snapshots(job_file, tmp_path):
    job = job_file
    ps = ["--set", "train.max_steps=6", "--set", "ps.consistency=sync", "--set", "ps.snapshot_every=0"]
    out = tmp_path / "run"
    done = run_disttrain("ps-cluster", job, *ps, "--servers", "2", "--workers", "1", "--insecure", "--out", out,
                         timeout=300)
    assert done.returncode == 0, done.stderr
    final = [line for line in done.stdout.splitlines() if line.startswith("final:")][-1]
    evaluated = run_disttrain("eval", job, "--checkpoint", out / "ps-snapshots")
    assert evaluated.returncode == 0, evaluated.stderr
    lines = evaluated.stdout.splitlines()
    assert lines[0].startswith(f"parameter-server snapshots {out / 'ps-snapshots'} (2 server(s), ")
    assert lines[-1].startswith(final)      # the servers' weights are the ones worker 0 evaluated last
    wrong = run_disttrain("eval", job, "--set", "model.hidden=12", "--checkpoint", out / "ps-snapshots")
    assert wrong.returncode == 2 and "written by the servers of another model" in wrong.stderr

