"""`disttrain run` (train a job: local, data-parallel or pipeline mode).

A JobSpecError or CheckpointError is printed as its message alone (no traceback), once (by rank 0 under
mpiexec), and the exit status is 2; so is an OpError of the first step (a model that does not fit its data).

Under mpiexec the ranks first check and load what each needs on its own (the job, its data, the output
directory, the checkpoint), then agree on the outcome before any collective: a mistake met on some ranks only
(a file missing on one host) stops every rank at once with its message, where a rank stopping alone would
leave the others waiting in their first collective until [parallel] timeout_s. After that, a rank that fails
aborts the job (MPI_Abort).

A file the run needs that cannot be written (a full disk, a read-only file system, the output directory removed)
ends it with one line naming the file, the error and the last good checkpoint, and exit status 74 (EX_IOERR),
which `disttrain launch` does not restart; under mpiexec rank 0 says it and aborts the job with that status.
One run at a time writes into an output directory: rank 0 holds its lock (train/run_lock.py) from before the
checks until the run ends, and a second run is refused (exit status 2) naming the first one's PID.
"""
import contextlib
import signal
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

from disttrain.cli import preflight
from disttrain.cli.common import (LogWriteError, after_write_error, as_output_write_error, fail, load_job_for,
                                  report_final, say_last_line)
from disttrain.cli.exit_codes import EXIT_DIVERGED, EXIT_DONE, EXIT_FAILURE, EXIT_IO, EXIT_SIGNAL, EXIT_USAGE
from disttrain.autograd.function import OpError
from disttrain.parallel.comm import abort_on_error
from disttrain.parallel.data_parallel import ModelMismatchError
from disttrain.parallel.mpi_job import agree_on_setup, launched_rank, launched_size, mode_for, run_context, share_cores
from disttrain.tensor.threads import blas_kernel_note
from disttrain.train.build import describe_data, describe_model
from disttrain.train import run_lock
from disttrain.train.jobspec import JobSpecError
from disttrain.train.memory_plan import MEMORY_FILE
from disttrain.train.saving import DIRNAME, CheckpointError, list_checkpoints, load_checkpoint
from disttrain.train.loop import (CONFIG_FILE, CURVES_FILE, METRICS_FILE, MemoryBudgetExceeded, Trainer,
                                  TrainingDiverged, TrainingInterrupted, check_new_run)
from disttrain.train.outputs import OutputWriteError


# Mistakes in the job, its files or the options (every rank meets a ModelMismatchError: factories that build
# other models on other ranks), or an output directory another run is writing into: one line, exit status 2
USAGE_ERRORS = (JobSpecError, CheckpointError, ModelMismatchError, run_lock.RunLockedError)
# What a run writes into its output directory, in the order the final line lists them
OUTPUTS = (METRICS_FILE, CONFIG_FILE, CURVES_FILE, MEMORY_FILE, DIRNAME)


class SecondSignal(KeyboardInterrupt):
    """A second SIGINT / SIGTERM while the run was stopping: it ends at once, without a checkpoint."""

    def __init__(self, signal_name):
        super().__init__(f"second {signal_name}: aborting without a checkpoint")
        self.signal_name = signal_name


def main(args):
    """disttrain run JOB.toml [--set k=v ...] [--out DIR] [--resume | --overwrite] [--device cpu|cuda]."""
    with contextlib.ExitStack() as held:            # the output directory's lock, until the run ends
        return _run(args, held)


def _run(args, held):
    error = None
    try:
        spec, out, data, checkpoint = _prepare(args, held)
    except USAGE_ERRORS as exc:
        error = exc
    except Exception as exc:                     # a crash: alone, as it is; among ranks, they all stop
        if launched_size() <= 1:
            raise
        traceback.print_exc()
        error = exc
    failed = agree_on_setup(None if error is None else (isinstance(error, USAGE_ERRORS), _said(error)),
                            job=None if error is not None else spec.to_dict())
    if failed:
        return _fail_setup(failed)
    try:
        with _abort_unless_alike():
            trainer = _build(args, spec, out, data, checkpoint)
    except USAGE_ERRORS + (OpError,) as exc:
        return fail("run", exc)
    try:
        return _train(args, trainer, out, checkpoint)
    except LogWriteError as exc:                 # its output on a full or read-only disk, outside the training
        return _say_abort(as_output_write_error(exc, trainer))


def _train(args, trainer, out, checkpoint):
    """Describe the run, train, report; the exit status."""
    _describe(trainer, out, checkpoint)
    start = time.perf_counter()
    try:
        with _stop_on_signals(trainer), run_context(trainer.mode, args.trace,
                                                    (TrainingInterrupted, TrainingDiverged), steps=args.trace_steps):
            try:
                evals = trainer.fit()
            except (OutputWriteError, LogWriteError, SecondSignal) as exc:   # one line; under mpiexec all stop
                status = _say_abort(as_output_write_error(exc, trainer) if isinstance(exc, LogWriteError) else exc)
                if launched_size() > 1:
                    raise SystemExit(status) from None           # run_context aborts the job with this status
                return status
    except TrainingInterrupted as exc:
        if trainer.mode.is_main:
            print(f"{exc} in {trainer.last_checkpoint}; continue with --resume", file=sys.stderr)
        return EXIT_SIGNAL.get(exc.signal_name, EXIT_FAILURE)
    except TrainingDiverged as exc:
        if trainer.mode.is_main:
            print(f"disttrain run: {exc}", file=sys.stderr)
            print(_after_divergence(exc), file=sys.stderr)
        return EXIT_DIVERGED
    except MemoryBudgetExceeded as exc:         # every rank measures the same peak: one says it
        if trainer.mode.is_main:
            print(f"disttrain run: {exc}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        trainer.mode.close()
    if trainer.mode.is_main:                     # under mpirun: one report, from the process that logs
        report_final(evals, trainer.data)
        written = [name + ("/" if name == DIRNAME else "") for name in OUTPUTS if (out / name).exists()]
        print(f"done in {time.perf_counter() - start:.1f} s; outputs in {out}/ ({', '.join(written)})")
    return EXIT_DONE


def _prepare(args, held):
    """(spec, out, data, checkpoint): what this rank checks and loads on its own, before any collective; rank 0
    takes the output directory's lock into `held` (an ExitStack) before it looks at what the directory holds."""
    spec = load_job_for(args, "run")
    out = Path(args.out) if args.out else Path("runs") / Path(args.job).stem
    data = preflight.check_run(args, spec, out)       # before anything large is allocated or MPI waits
    if launched_rank() == 0:
        held.enter_context(run_lock.held(out))
    checkpoint = _checkpoint_to_resume(out) if args.resume else None
    if not args.resume and not args.overwrite:
        check_new_run(out)                       # never replace an earlier run's checkpoints silently
    return spec, out, data, checkpoint


def _build(args, spec, out, data, checkpoint):
    share_cores()                                # N ranks on a node: cores / N threads each
    mode = mode_for(spec)                        # local, or data / pipeline under mpirun
    trainer = Trainer.from_job(spec, out_dir=out, mode=mode, data=data, overwrite=args.overwrite)
    if checkpoint is not None:
        trainer.restore(checkpoint)
    return trainer


def _said(error):
    """An error in one line: a mistake (USAGE_ERRORS) as its message, anything else with its type."""
    if isinstance(error, USAGE_ERRORS):
        return str(error)
    return f"{type(error).__name__}: {error} (its traceback above)"


def _fail_setup(failed):
    """Report the ranks' setup failures ([(rank, (a mistake?, message))]) once, from rank 0, naming the ranks
    unless all failed alike; the exit status is 2 when each is a mistake in the job, its files or the options,
    else 1."""
    ranks_by_text = {}
    for rank, (_, text) in failed:
        ranks_by_text.setdefault(text, []).append(rank)
    if len(ranks_by_text) == 1 and len(failed) == launched_size():
        fail("run", next(iter(ranks_by_text)))
    else:
        for text, ranks in ranks_by_text.items():
            fail("run", f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}: {text}")
    return EXIT_USAGE if all(mistake for _, (mistake, _) in failed) else EXIT_FAILURE


def _abort_unless_alike():
    """Under mpiexec, a failure while the ranks build the mode and the trainer aborts the job, except for the
    mistakes every rank meets alike (a job that does not fit the launch, a model that does not fit its data),
    which each rank reports and returns."""
    if launched_size() <= 1:
        return contextlib.nullcontext()
    return abort_on_error(passthrough=USAGE_ERRORS + (OpError,))


def _checkpoint_to_resume(out):
    """The newest checkpoint of the run in `out` that verifies (CheckpointError when there is none)."""
    if not list_checkpoints(out):
        if (out / METRICS_FILE).exists():        # a run that stopped before its first checkpoint
            raise CheckpointError(f"--resume: no checkpoint in {out} (expected {out / 'checkpoints'}/step-NNNNNN/): "
                                  f"its run stopped before its first checkpoint; start it over with --overwrite")
        raise CheckpointError(f"--resume: no checkpoint in {out} (expected {out / 'checkpoints'}/step-NNNNNN/); "
                              f"run without --resume to start the job")
    return load_checkpoint(out)


def _say_abort(exc):
    """Say why the run ended at once (OutputWriteError: rank 0, which writes; SecondSignal: each rank that got it)
    in one line; returns the exit status."""
    if isinstance(exc, SecondSignal):
        print(f"disttrain run: {exc}", file=sys.stderr, flush=True)
        return EXIT_SIGNAL.get(exc.signal_name, EXIT_FAILURE)
    say_last_line(f"disttrain run: error: {exc}; {after_write_error(exc)}")     # (stderr may be what failed)
    return EXIT_IO


def _after_divergence(exc):
    """What to type next after TrainingDiverged."""
    if exc.last_checkpoint is None:
        return ('start over with --overwrite and a lower --set optim.lr=..., a --set optim.clip_norm=..., or '
                '--set train.on_nonfinite=skip')
    return ("continue from that checkpoint with --resume and a lower --set optim.lr=... (or a --set "
            "optim.clip_norm=..., or --set train.on_nonfinite=skip)")


def _describe(trainer, out, checkpoint):
    if not trainer.mode.is_main:                 # under mpirun: one description, from the process that logs
        return
    spec, mode = trainer.spec, trainer.mode
    where = f"resuming {trainer.resume_point()}" if checkpoint else "starting"
    for line in (checkpoint.skipped if checkpoint else []) + trainer.resume_changes:
        print(f"disttrain run: {line}", file=sys.stderr, flush=True)
    print(f"job {spec.source}: {describe_data(spec, trainer.data)}; model {describe_model(spec)}, "
          f"{mode.parameter_count():,} parameters; {len(trainer.train_iter)} steps/epoch x {spec.train.epochs} epochs"
          + (f", max {spec.train.max_steps} steps" if spec.train.max_steps else "")
          + f"; device {mode.device}; {where}; outputs in {out}/", flush=True)
    unit = "streams" if trainer.data.sequential else trainer.data.unit
    print("\n".join(mode.describe(spec.data.batch_size, unit)), flush=True)
    note = blas_kernel_note() if mode.device == "cpu" else None
    if note:
        print(note, file=sys.stderr, flush=True)


@contextmanager
def _stop_on_signals(trainer):
    """SIGINT/SIGTERM: ask the trainer to checkpoint and stop after its current step; a second one aborts."""
    def handler(signum, frame):
        name = signal.Signals(signum).name
        if trainer.stop_requested:
            raise SecondSignal(name)
        print(f"\n{name}: writing a checkpoint after the current step (again to abort now)", file=sys.stderr,
              flush=True)
        trainer.request_stop(name)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
