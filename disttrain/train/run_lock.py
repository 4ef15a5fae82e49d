"""One run at a time in a run directory: `disttrain run` holds an exclusive lock on DIR/.lock while it runs.

    with run_lock.held(out):        # RunLockedError (naming the holder's PID) when another run holds it
        ...train into out...

Two runs writing one directory would undo each other's work: one deletes the other's half-written step-N.tmp,
both append to metrics.jsonl. The lock is an flock(2) on DIR/.lock, which the kernel releases when its holder
exits however it ends (kill -9 included), so a stale lock file never blocks a run; the file holds the
holder's PID only to name it in the error. Under mpiexec the rank that writes the outputs (rank 0) holds it.
A directory the lock made and nothing else wrote into (a run refused before it started) is removed again.
"""
import contextlib
import fcntl
import os
from pathlib import Path

__all__ = ["LOCK_FILE", "RunLockedError", "held"]

LOCK_FILE = ".lock"


class RunLockedError(RuntimeError):
    """Another process holds the run directory's lock: a run is writing into it."""


@contextlib.contextmanager
def held(run_dir):
    """Hold run_dir's lock within (run_dir is made when missing); RunLockedError when another process holds it."""
    run_dir = Path(run_dir)
    made = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = _locked(run_dir / LOCK_FILE)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        if made:
            _remove_if_unused(run_dir)
        os.close(fd)           # releases the lock


def _remove_if_unused(run_dir):
    """Remove run_dir when it holds the lock file alone (unlinked while still locked: see _locked)."""
    with contextlib.suppress(OSError):       # written into, removed, or made again meanwhile: left as it is
        if os.listdir(run_dir) == [LOCK_FILE]:
            os.unlink(run_dir / LOCK_FILE)
            os.rmdir(run_dir)


def _locked(path):
    """An fd of `path` holding its exclusive flock. The file may be unlinked by a holder that made it (held's
    clean-up) while another process waits to open it: a lock on an unlinked file locks nothing, so that case
    tries again on the file now at `path`."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise RunLockedError(f"{path.parent} is in use by another run ({holder}): wait for it to end, stop "
                                 f"it, or choose another --out") from None
        if os.fstat(fd).st_nlink > 0:
            return fd
        os.close(fd)


def _holder(fd):
    """'PID 1234', from the lock file, or a vaguer phrase when it does not hold one yet."""
    text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    return f"PID {text}" if text.isdigit() else "its PID not written yet"
