"""`disttrain run` when its files cannot be written (README "When things go wrong"): optional outputs warn and
training goes on; a checkpoint or metrics.jsonl that cannot be written ends the run in one line with exit 74; a
metrics.jsonl shorter than its checkpoint says; the output directory removed mid-run; two runs in one directory;
a second Ctrl-C."""
import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import disttrain
from cli_testing import REPO, disttrain_cmd, metric_rows
from disttrain.cli import preflight
from disttrain.cli.main import main
from disttrain.train import Trainer, run_lock, saving

needs_dev_full = pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")


def run_args(job_file, text_file, out, *sets):
    args = ["run", str(job_file), "--set", "data.kind=chars", "--set", f"data.path={text_file}",
            "--set", "train.log_every=1", "--set", "train.eval_every=2", "--set", "train.checkpoint_every=2",
            "--out", str(out)]
    for item in sets:
        args += ["--set", item]
    return args


def without_escaping_interrupts(args):
    """main(args), failing the test (not ending the session) when a KeyboardInterrupt escapes it."""
    try:
        return main(args)
    except KeyboardInterrupt as exc:
        pytest.fail(f"a KeyboardInterrupt escaped `disttrain run`: {exc!r}")


def train_rows(run_dir):
    return [r for r in metric_rows(run_dir) if r["split"] == "train"]


def error_lines(err):
    return [line for line in err.splitlines() if "error" in line or "warning" in line or "Traceback" in line]


@needs_dev_full
def test_curves_and_memory_json_that_cannot_be_written_warn_once_and_training_goes_on(job_file, text_file, tmp_path,
                                                                                       capsys):
    assert main(run_args(job_file, text_file, tmp_path / "whole", "train.max_steps=8")) == 0
    out = tmp_path / "run"
    assert main(run_args(job_file, text_file, out, "train.max_steps=4")) == 0
    (out / "curves.png").unlink()
    (out / "curves.png.tmp").mkdir()                         # every plot fails: IsADirectoryError
    (out / "memory.json.tmp").symlink_to("/dev/full")        # the next memory.json fails: ENOSPC
    capsys.readouterr()
    assert main(run_args(job_file, text_file, out, "train.max_steps=8") + ["--resume"]) == 0
    captured = capsys.readouterr()
    assert error_lines(captured.err + captured.out) == [
        f"warning: cannot write {out / 'memory.json'}: No space left on device; training goes on without it",
        f"warning: cannot write {out / 'curves.png'} ({out / 'curves.png.tmp'}): Is a directory; training goes on "
        f"without it"]
    assert train_rows(out) == train_rows(tmp_path / "whole")                # no step lost
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000006", "step-000008"]
    assert not (out / "memory.json.tmp").exists() and (out / "memory.json").exists()   # written again later
    assert captured.out.rstrip().endswith(f"outputs in {out}/ (metrics.jsonl, config.toml, memory.json, "
                                          f"checkpoints/)")                 # no curves.png: none was written


@pytest.mark.parametrize("code, advice", [(errno.ENOSPC, "free space and continue with --resume"),
                                          (errno.EROFS, "make it writable and continue with --resume"),
                                          (errno.ENOTDIR, "fix that and continue with --resume")])
def test_a_checkpoint_that_cannot_be_written_ends_the_run_in_one_line_with_exit_74(job_file, text_file, tmp_path,
                                                                                    capsys, monkeypatch, code, advice):
    assert main(run_args(job_file, text_file, tmp_path / "whole", "train.max_steps=6")) == 0
    out = tmp_path / "run"
    real_write = saving._write_file

    def failing_disk(path, data):
        if path.parent.name == "step-000004.tmp" and path.name == "state.safetensors":
            raise OSError(code, os.strerror(code), str(path))
        return real_write(path, data)

    monkeypatch.setattr(saving, "_write_file", failing_disk)
    capsys.readouterr()
    assert main(run_args(job_file, text_file, out, "train.max_steps=6")) == 74
    checkpoints = out / "checkpoints"
    assert capsys.readouterr().err.splitlines()[-1:] == [
        f"disttrain run: error: cannot write {checkpoints / 'step-000004.tmp' / 'state.safetensors'}: "
        f"{os.strerror(code)}; the last good checkpoint is {checkpoints / 'step-000002'}; {advice}"]
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-000002"]
    monkeypatch.undo()
    assert main(run_args(job_file, text_file, out, "train.max_steps=6") + ["--resume"]) == 0
    assert metric_rows(out) == metric_rows(tmp_path / "whole")


@needs_dev_full
def test_metrics_that_cannot_be_written_end_the_run_in_one_line(job_file, text_file, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").symlink_to("/dev/full")
    assert main(run_args(job_file, text_file, out, "train.max_steps=4") + ["--overwrite"]) == 74
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == (f"disttrain run: error: cannot write {out / 'metrics.jsonl'}: No space left on "
                                    f"device; no checkpoint of this run is on disk; free space and start the run "
                                    f"again (with --overwrite where its directory holds files)")
    assert "Traceback" not in err and "During handling" not in err


@needs_dev_full
def test_output_that_cannot_be_written_ends_the_run_in_one_line(job_file, text_file, tmp_path):
    """stdout on a full disk (a log file): the same one line and exit 74 as a file of the run, no traceback."""
    out = tmp_path / "run"
    with open("/dev/full", "w") as full:
        done = subprocess.run(disttrain_cmd(*run_args(job_file, text_file, out, "train.max_steps=4")), cwd=REPO,
                              stdout=full, stderr=subprocess.PIPE, text=True, timeout=120)
    assert done.returncode == 74, done.stderr
    assert done.stderr.splitlines() == [
        "disttrain run: error: cannot write /dev/full: No space left on device; no checkpoint of this run is on "
        "disk; free space and start the run again (with --overwrite where its directory holds files)"]


def test_a_metrics_file_shorter_than_its_checkpoint_keeps_its_rows_and_the_run_goes_on(job_file, text_file, tmp_path,
                                                                                       capsys):
    assert main(run_args(job_file, text_file, tmp_path / "whole", "train.max_steps=8")) == 0
    out = tmp_path / "run"
    assert main(run_args(job_file, text_file, out, "train.max_steps=4")) == 0
    lines = (out / "metrics.jsonl").read_text().splitlines(keepends=True)
    (out / "metrics.jsonl").write_text("".join(lines[:2]) + lines[2][:10])        # a power loss's leftovers
    capsys.readouterr()
    assert main(run_args(job_file, text_file, out, "train.max_steps=8") + ["--resume"]) == 0
    captured = capsys.readouterr()
    missing = sum(len(line) for line in lines[2:])
    assert (f"disttrain run: {out / 'metrics.jsonl'} lacks {len(lines) - 2} row(s), {missing} bytes that the "
            f"checkpoint of step 4 recorded (lost before they reached the disk, or cut); keeping its 2 complete "
            f"row(s) and going on; nothing else is lost\n") in captured.err
    whole = metric_rows(tmp_path / "whole")
    assert metric_rows(out) == whole[:2] + [r for r in whole if r["step"] > 4]   # the rest as if nothing happened


def test_a_second_run_in_the_same_directory_is_refused_naming_the_first(job_file, text_file, tmp_path, capsys):
    out = tmp_path / "run"
    with run_lock.held(out):                                 # as a run in progress holds it
        assert main(run_args(job_file, text_file, out, "train.max_steps=2")) == 2
        assert main(run_args(job_file, text_file, out, "train.max_steps=2") + ["--overwrite"]) == 2
        assert os.listdir(out) == [run_lock.LOCK_FILE]        # nothing written
    assert capsys.readouterr().err.splitlines() == [
        f"disttrain run: error: {out} is in use by another run (PID {os.getpid()}): wait for it to end, stop it, or "
        f"choose another --out"] * 2
    assert main(run_args(job_file, text_file, out, "train.max_steps=2")) == 0
    with pytest.raises(run_lock.RunLockedError):             # the same lock from another process's point of view
        with run_lock.held(out):
            with run_lock.held(out):
                pass


def test_a_refused_resume_leaves_no_directory_behind(job_file, text_file, tmp_path, capsys):
    assert main(run_args(job_file, text_file, tmp_path / "none", "train.max_steps=2") + ["--resume"]) == 2
    assert "--resume: no checkpoint in" in capsys.readouterr().err and not (tmp_path / "none").exists()


def test_the_output_directory_removed_mid_run_stops_it_in_one_line(job_file, text_file, tmp_path):
    out = tmp_path / "run"
    args = run_args(job_file, text_file, out, "train.max_steps=400", "train.epochs=50", "train.checkpoint_every=20",
                    "train.eval_every=100")
    proc = subprocess.Popen(disttrain_cmd(*args), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not list((out / "checkpoints").glob("step-*[0-9]/manifest.json")):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.005)
        shutil.rmtree(out)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 74, stderr
    last = stderr.splitlines()[-1]
    assert last.startswith(f"disttrain run: error: {out} was removed while the run wrote into it; stopped at step "), last
    assert last.endswith("without writing a checkpoint; no checkpoint of this run is on disk; start the run again")
    assert not out.exists() and "done in" not in stdout and "Traceback" not in stderr


def test_a_second_sigint_aborts_in_one_line(job_file, text_file, tmp_path, capsys, monkeypatch):
    real_after_step = Trainer._after_step

    def interrupted_twice(self):
        real_after_step(self)
        if self.step == 3:
            signal.raise_signal(signal.SIGINT)               # the handler asks for a checkpoint...
            signal.raise_signal(signal.SIGINT)               # ...and the second one aborts at once

    monkeypatch.setattr(Trainer, "_after_step", interrupted_twice)
    assert without_escaping_interrupts(run_args(job_file, text_file, tmp_path / "run", "train.max_steps=8")) == 130
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == "disttrain run: second SIGINT: aborting without a checkpoint", err
    assert "Traceback" not in err


def test_ctrl_c_while_starting_says_one_line(job_file, text_file, tmp_path, capsys, monkeypatch):
    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(preflight, "check_run", interrupted)     # Ctrl-C while the job's data loads
    assert without_escaping_interrupts(run_args(job_file, text_file, tmp_path / "run")) == 130
    assert capsys.readouterr().err == "disttrain: interrupted by SIGINT\n"


def test_ctrl_c_while_disttrain_imports_says_one_line():
    """SIGINT right after the `disttrain` script starts, at several points of its first tenths of a second (`import
    disttrain`, the command): never a traceback; interrupted, one line and 130. A SIGINT while the interpreter
    itself starts (its site module: before any line of the script) is Python's own fatal error, and one while the
    console script imports disttrain_entry (a traceback with no frame in the disttrain package) is in the stub
    pip wrote; both come before any code of ours can handle it."""
    script = Path(sys.executable).with_name("disttrain")
    package = str(Path(disttrain.__file__).parent) + os.sep
    interrupted = 0
    for delay in [0.02 * k for k in range(1, 26, 2)]:
        proc = subprocess.Popen([str(script), "--help"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
        if "Fatal Python error: init_import_site" in stderr or ("Traceback" in stderr and package not in stderr):
            continue
        assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, (delay, stderr)
        assert proc.returncode in (0, 130, -signal.SIGINT), (delay, proc.returncode, stderr)
        if proc.returncode == 130:
            interrupted += 1
            assert stderr.splitlines() == ["disttrain: interrupted by SIGINT"], (delay, stderr)
    assert interrupted, "no SIGINT reached the script while it ran"
