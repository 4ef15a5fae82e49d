"""What the `disttrain` sub-commands share: the JOB.toml and --set arguments, loading the job, failing in one line
and the final report of an evaluation."""
import errno
import sys

from disttrain.cli.exit_codes import EXIT_USAGE

__all__ = ["add_job_arguments", "load_job_for", "fail", "report_final"]


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
