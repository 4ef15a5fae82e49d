"""What the `disttrain` sub-commands share: the JOB.toml and --set arguments, loading the job, failing in one line,
the final report of an evaluation, and what a failed write of the command's own output (stdout, stderr: a terminal,
a pipe, or a log file such as ps-cluster's logs/worker-K.log on a full disk) does."""
import contextlib
import errno
import os
import sys

from disttrain.cli.exit_codes import EXIT_IO, EXIT_USAGE

__all__ = ["LogWriteError", "add_job_arguments", "after_write_error", "as_output_write_error", "console_guarded",
           "fail", "guarded_command", "load_job_for", "report_final", "say_last_line"]


def add_job_arguments(parser, set_example="optim.lr=0.5", device=None):
    """JOB.toml, --set SECTION.KEY=VALUE (repeatable) and, when `device` says what the device is for (e.g.
    "where to train"), --device cpu|cuda."""
    parser.add_argument("job", metavar="JOB.toml", help="the job spec (TOML)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help=f"override one key of the job, e.g. --set {set_example} (repeatable)")
    if device:
        parser.add_argument("--device", choices=("cpu", "cuda"), help=f"{device} (overrides [train] device)")


def load_job_for(args, command):
    """The job of `disttrain run | eval` (args.job, args.overrides, args.device): JobSpecError when it is a
    parameter-server job (those start with ps-cluster) or wants a GPU this machine does not have."""
    from disttrain.train.jobspec import JobSpecError, load_job

    device = getattr(args, "device", None)                  # plan has no --device
    overrides = list(args.overrides) + ([f"train.device={device}"] if device else [])
    spec = load_job(args.job, overrides)
    if spec.parallel.mode == "ps" and command == "run":
        raise JobSpecError(f'{spec.source}: [parallel] mode = "ps" is a parameter-server job: start it with '
                           f'`disttrain ps-cluster {args.job}` (servers and workers on this machine), or ps-server and '
                           f'ps-worker on several (docs/PARAMSERVER.md)')
    if spec.train.device == "cuda":
        from disttrain.tensor.backend import get_backend

        try:
            get_backend("cuda")
        except RuntimeError as exc:
            where = "--device cuda" if device else f'{spec.source}: [train] device = "cuda"'
            raise JobSpecError(f"{where}: {exc}") from None
    return spec


def fail(command, exc):
    """Print `disttrain COMMAND: error: EXC` once (under mpiexec every rank meets the same error: rank 0 says it);
    returns EXIT_USAGE."""
    from disttrain.parallel.mpi_job import launched_rank

    if launched_rank() == 0:
        print(f"disttrain {command}: error: {exc}", file=sys.stderr)
    return EXIT_USAGE


def report_final(evals, data):
    """The final line: perplexity (and bits per character) of language data, the loss of any other."""
    splits = [split for split in data.eval_splits if split in evals]
    if data.language:
        parts = [f"{split} ppl {evals[split].ppl:.3f}" for split in splits]
    else:
        parts = [f"{split} loss {evals[split].loss:.4f}" for split in splits]
    if getattr(data, "char_level", False):
        parts += [f"{split} bpc {evals[split].bpc:.4f}" for split in splits]
    print("final: " + (" | ".join(parts) or "no evaluation splits"), flush=True)


def after_write_error(exc):
    """What to do after an OutputWriteError (a run's output that could not be written), by its OS error."""
    if exc.errno == errno.ENOSPC:
        fix = "free space"
    elif exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        fix = "make it writable"
    elif exc.errno is None:                      # the directory was removed: nothing to fix on the disk
        return "continue with --resume" if exc.last_checkpoint is not None else "start the run again"
    else:
        fix = "fix that"
    return f"{fix} and continue with --resume" if exc.last_checkpoint is not None else \
        f"{fix} and start the run again (with --overwrite where its directory holds files)"


class LogWriteError(OSError):
    """The command's stdout or stderr could not be written (ENOSPC, EROFS, EIO, ...); `filename` names the file it
    goes to, as far as the system says."""


class _GuardedStream:
    """A text stream whose failed writes raise LogWriteError naming where the stream goes; everything else is the
    stream's own. A broken pipe stays a BrokenPipeError (`disttrain ... | head`: the reader left)."""

    def __init__(self, stream, name):
        self._stream, self._name = stream, name
        self.failed = False

    def __getattr__(self, attribute):
        return getattr(self._stream, attribute)

    def write(self, text):
        with self._guarded():
            return self._stream.write(text)

    def flush(self):
        with self._guarded():
            self._stream.flush()

    @contextlib.contextmanager
    def _guarded(self):
        try:
            yield
        except BrokenPipeError:
            raise
        except OSError as exc:
            self.failed = True
            raise LogWriteError(exc.errno, exc.strerror or str(exc), _where(self._stream, self._name)) from None

    def silence(self):
        """After a failure: point the stream's file descriptor at /dev/null, so that the interpreter's flush of what
        is still buffered at exit does not fail a second time."""
        try:
            fd = self._stream.fileno()
        except (OSError, ValueError, AttributeError):      # a stream without a descriptor (captured in tests)
            return
        os.dup2(os.open(os.devnull, os.O_WRONLY), fd)


def _where(stream, name):
    """The file `stream` writes to (its /proc/self/fd link on Linux), else `name` ("stdout", "stderr")."""
    try:
        return os.readlink(f"/proc/self/fd/{stream.fileno()}")
    except (OSError, ValueError, AttributeError):
        return name


@contextlib.contextmanager
def console_guarded():
    """sys.stdout and sys.stderr raise LogWriteError when a write fails, while the command runs; a stream that
    failed is silenced on the way out."""
    guarded = {name: _GuardedStream(getattr(sys, name), name) for name in ("stdout", "stderr")}
    saved = {name: getattr(sys, name) for name in guarded}
    for name, stream in guarded.items():
        setattr(sys, name, stream)
    try:
        yield
    finally:
        for name, stream in guarded.items():
            setattr(sys, name, saved[name])
            if stream.failed:
                stream.silence()


def as_output_write_error(exc, trainer):
    """The OutputWriteError a LogWriteError met while `trainer` ran (None: no trainer yet) amounts to: the file, the
    OS error and the last good checkpoint still on disk, for the one line and exit status 74 of any such write."""
    from disttrain.train.outputs import OutputWriteError

    outputs = trainer.outputs if trainer is not None else None
    return OutputWriteError(exc.filename, f"cannot write {exc.filename}: {exc.strerror}", exc.errno,
                            outputs.checkpoint_on_disk() if outputs is not None else None)


def guarded_command(command, run):
    """run(), the command's whole work, with console_guarded: a LogWriteError it did not report itself becomes one
    line (`COMMAND: error: cannot write FILE: ...`, if stderr still takes it) and exit status EXIT_IO."""
    try:
        with console_guarded():
            return run()
    except LogWriteError as exc:
        say_last_line(f"{command}: error: cannot write {exc.filename}: {exc.strerror}")
        return EXIT_IO


def say_last_line(text):
    """Print `text` to stderr if it can still be written: after a LogWriteError the exit status has to say it."""
    try:
        print(text, file=sys.stderr, flush=True)
    except OSError:
        pass
