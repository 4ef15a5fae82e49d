"""`disttrain run` (train a job: local, data-parallel or pipeline mode).

A JobSpecError or CheckpointError is printed as its message alone (no traceback), once (by rank 0 under
mpiexec: every rank meets the same one), and the exit status is 2.
"""
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from disttrain.cli import preflight
from disttrain.cli.common import fail, load_job_for, report_final
from disttrain.cli.exit_codes import EXIT_DIVERGED, EXIT_DONE, EXIT_FAILURE, EXIT_SIGNAL, EXIT_USAGE
from disttrain.parallel.mpi_job import mode_for, run_context, share_cores
from disttrain.tensor.threads import blas_kernel_note
from disttrain.train.build import describe_data, describe_model
from disttrain.train.jobspec import JobSpecError
from disttrain.train.saving import CheckpointError, list_checkpoints, load_checkpoint
from disttrain.train.loop import (MemoryBudgetExceeded, Trainer, TrainingDiverged, TrainingInterrupted,
                                  check_new_run)



def main(args):
    """disttrain run JOB.toml [--set k=v ...] [--out DIR] [--resume | --overwrite] [--device cpu|cuda]."""
    try:
        spec = load_job_for(args, "run")
        out = Path(args.out) if args.out else Path("runs") / Path(args.job).stem
        data = preflight.check_run(args, spec, out)       # before anything large is allocated or MPI waits
        checkpoint = _checkpoint_to_resume(out) if args.resume else None
        if not args.resume and not args.overwrite:
            check_new_run(out)                   # never replace an earlier run's checkpoints silently
        share_cores()                            # N ranks on a node: cores / N threads each
        mode = mode_for(spec)                    # local, or data / pipeline under mpirun
        trainer = Trainer.from_job(spec, out_dir=out, mode=mode, data=data, overwrite=args.overwrite)
        if checkpoint is not None:
            trainer.restore(checkpoint)
    except (JobSpecError, CheckpointError) as exc:
        return fail("run", exc)

    _describe(trainer, out, checkpoint)
    start = time.perf_counter()
    try:
        with _stop_on_signals(trainer), run_context(trainer.mode, args.trace,
                                                    (TrainingInterrupted, TrainingDiverged), steps=args.trace_steps):
            evals = trainer.fit()
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
        print(f"done in {time.perf_counter() - start:.1f} s; outputs in {out}/ (metrics.jsonl, config.toml, "
              f"curves.png, memory.json, checkpoints/)")
    return EXIT_DONE


def _checkpoint_to_resume(out):
    """The newest checkpoint of the run in `out` that verifies (CheckpointError when there is none)."""
    if not list_checkpoints(out):
        raise CheckpointError(f"--resume: no checkpoint in {out} (expected {out / 'checkpoints'}/step-NNNNNN/); "
                              f"run without --resume to start the job")
    return load_checkpoint(out)


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
    where = f"resuming at step {trainer.step} (epoch {trainer.epoch + 1})" if checkpoint else "starting"
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
            raise KeyboardInterrupt(f"second {name}: aborting without a checkpoint")
        print(f"\n{name}: writing a checkpoint after the current step (again to abort now)", file=sys.stderr,
              flush=True)
        trainer.request_stop(name)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
