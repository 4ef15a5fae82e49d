"""`disttrain launch`: run a job under mpiexec and restart it from its last checkpoint when it fails.

    disttrain launch -n 4 [--max-restarts 3] [--restart-n 2] JOB.toml [run options: --set k=v --out DIR ...]

Each attempt runs `MPIEXEC -n N PYTHON -m disttrain.cli.main run JOB [run options] --out DIR`: the mpiexec
next to this Python (the mpich wheel's, in a virtual environment), else the one on PATH, and this Python.
The first attempt resumes from DIR's checkpoint only when --resume is given (and gets every run option as
given); after a failure the next attempt resumes from the newest checkpoint in DIR when there is one (else it
starts again), up to --max-restarts times, and says so in one line.

Restarted: every failure but exit status 2 (a mistake in the job or the options: the same run would fail
the same way), 3 (the run diverged: resumed from its last checkpoint it would diverge again), 74 (a file of
the run could not be written: the disk is still full or read-only) and 130 / 143
(stopped on purpose by SIGINT / SIGTERM, after a checkpoint); cli/exit_codes.py lists them. A hung rank ends
its attempt through the watchdog ([parallel] timeout_s), so it is restarted too.

World size: --restart-n M runs the restarts on M ranks instead of N (a checkpoint resumes on any number of
ranks that divides the batch): e.g. after losing a machine, or to continue on fewer cores.

SIGINT and SIGTERM sent to `disttrain launch` go to the running attempt once (mpiexec passes them to the
ranks, which checkpoint and stop) and end the launch without a restart. If `disttrain launch` itself is
killed (SIGKILL), the attempt gets SIGTERM the same way (Linux: subprocesses.end_with_parent). The exit status
is the last attempt's.
"""
import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from disttrain.cli.exit_codes import EXIT_USAGE, NOT_RESTARTED
from disttrain.subprocesses import end_with_parent

__all__ = ["register", "main", "mpiexec_path", "NOT_RESTARTED"]

_FIRST_ATTEMPT_ONLY = ("--overwrite",)       # run options that must not reach a restart (it resumes instead)


def register(subparsers):
    p = subparsers.add_parser(
        "launch", help="run a job under mpiexec, restarting it from its last checkpoint after a failure",
        description="Run `disttrain run JOB` under mpiexec -n N; after a failure, run it again from its newest "
                    "checkpoint (--resume), up to --max-restarts times, on --restart-n ranks if given. Exit status "
                    "2 (a mistake in the job or options), 3 (diverged), 74 (its files could not be written) and "
                    "130/143 (stopped by a signal) are not restarted.",
        usage="disttrain launch -n N [--max-restarts R] [--restart-n M] JOB.toml [run options ...]")
    p.add_argument("-n", dest="ranks", type=_positive, required=True, metavar="N", help="ranks (mpiexec -n N)")
    p.add_argument("--max-restarts", type=_non_negative, default=3, metavar="R",
                   help="restarts after failures (default 3)")
    p.add_argument("--restart-n", type=_positive, metavar="M", help="ranks of the restarts (default N)")
    p.add_argument("job", metavar="JOB.toml", help="the job spec (TOML)")
    p.add_argument("run_options", nargs=argparse.REMAINDER, metavar="...",
                   help="options of `disttrain run` (--set, --out, --resume, --trace, ...)")


def main(args):
    mpiexec = mpiexec_path()
    if mpiexec is None:
        print("disttrain launch: error: no mpiexec next to this Python or on PATH (pip install mpich, or load "
              "the cluster's MPI)", file=sys.stderr)
        return EXIT_USAGE
    options, out, resume = _split_options(args.run_options, args.job)
    restarts = 0
    with _forwarded_signals() as state:
        while True:
            ranks = args.ranks if restarts == 0 else (args.restart_n or args.ranks)
            first = restarts == 0
            cmd = [mpiexec, "-n", str(ranks), sys.executable, "-m", "disttrain.cli.main", "run", args.job,
                   *(options if first else [o for o in options if o not in _FIRST_ATTEMPT_ONLY]),
                   "--out", str(out), *(["--resume"] if (resume if first else _checkpoint_step(out) is not None)
                                        else [])]
            if first:
                _log(f"{' '.join(cmd)} (up to {args.max_restarts} restart(s))")
            start = time.monotonic()
            status = state.run(cmd)
            if status in NOT_RESTARTED or state.stopping:
                if status:
                    _log(f"attempt {restarts + 1} ended with exit status {status} "
                         f"({NOT_RESTARTED.get(status, 'stopped by a signal to launch')}): not restarted")
                return status
            if restarts == args.max_restarts:
                _log(f"attempt {restarts + 1} on {ranks} rank(s) ended with exit status {status}; no restarts left "
                     f"(--max-restarts {args.max_restarts})")
                return status
            restarts += 1
            _log(_restart_line(restarts, args, ranks, status, time.monotonic() - start, out))


def _restart_line(restart, args, ranks, status, seconds, out):
    step = _checkpoint_step(out)
    where = f"resuming from the checkpoint of step {step} in {out}" if step is not None else \
        f"from the start (no checkpoint in {out} yet)"
    nxt = args.restart_n or args.ranks
    return (f"attempt {restart} on {ranks} rank(s) ended with exit status {status} after {seconds:.1f} s; restart "
            f"{restart} of {args.max_restarts} on {nxt} rank(s), {where}")


def _split_options(options, job):
    """(run options without --out and --resume, the output directory, whether --resume was given)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--out")
    parser.add_argument("--resume", action="store_true")
    known, rest = parser.parse_known_args(options)
    out = Path(known.out) if known.out else Path("runs") / Path(job).stem
    return rest, out, known.resume


def _checkpoint_step(out):
    """The step of the checkpoint a resume of `out` would continue from, or None when there is none."""
    from disttrain.train.saving import list_checkpoints, step_of

    found = list_checkpoints(out)
    return step_of(found[0]) if found else None


def mpiexec_path():
    """The mpiexec beside this Python (a virtual environment's, from the mpich wheel), else PATH's, else None."""
    beside = Path(sys.executable).parent / "mpiexec"
    return str(beside) if beside.exists() else shutil.which("mpiexec")


class _Attempts:
    """Runs attempts one at a time; a SIGINT / SIGTERM to launch goes to the running attempt once."""

    def __init__(self):
        self.proc = None
        self.stopping = False

    def run(self, cmd):
        # a session of its own: a Ctrl-C in the terminal reaches launch alone, which passes it on exactly once;
        # and a SIGTERM when launch is killed (mpiexec passes it to the ranks: they checkpoint and stop)
        self.proc = subprocess.Popen(cmd, start_new_session=True, preexec_fn=end_with_parent(os.getpid()))
        try:
            return self.proc.wait()
        finally:
            self.proc = None

    def forward(self, signum, frame):
        self.stopping = True
        if self.proc is not None:
            self.proc.send_signal(signum)


@contextlib.contextmanager
def _forwarded_signals():
    attempts = _Attempts()
    previous = {sig: signal.signal(sig, attempts.forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield attempts
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _log(text):
    print(f"disttrain launch: {text}", file=sys.stderr, flush=True)


def _positive(text):
    value = _non_negative(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _non_negative(text):
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return value

