"""Watchdog: every wait for a collective or a message ends within [parallel] timeout_s, as NCCL's watchdog does.

    op = Operation("allreduce of gradient bucket 2", key=("world", 41), peers=(0, 1, 2))
    watchdog.wait(handle, op)      # tests the request until it completes; past timeout_s: report and abort

The Communicator starts every operation that can block as a non-blocking one and completes it here. `wait`
tests the request until it is done, as MPI_Wait would spin, yielding the processor between tests; only a wait
longer than a second sleeps a millisecond between tests (MPICH moves a large transfer forward only inside MPI
calls, so sleeping sooner would slow every transfer; a second is rare outside hangs and slow peers).

When a wait passes timeout_s, the rank finds out where the others are. A stopped, hung or dead rank cannot
answer, but the live ones can talk to each other: the rank sends its position (the operation it waits in,
with a key that is equal on every rank taking part in that same operation) to every other rank, on a
duplicate of MPI_COMM_WORLD so that nothing else ever matches these messages, and collects theirs for
`grace` seconds. A rank waiting anywhere checks for such a message every 50 ms and, on one, does the same.
Each live rank then prints one line: the operation that timed out, how long it waited, the ranks of that
operation that had not arrived (and where they are, or that they did not answer), and the job ends with
MPI_Abort(EXIT_TIMEOUT). A rank busy computing answers only when it next waits: after `grace` it counts as
not answering.

NOTE (abort delay): every live rank reports before the job ends: a rank aborts `abort_delay` seconds after
its own report, and the others' reports follow the first one within a poll interval (they wait as long
for the same silent ranks).
"""
import json
import os
import sys
import time
from dataclasses import dataclass

import numpy as np

from disttrain import trace

__all__ = ["Watchdog", "Operation", "WatchdogTimeout", "describe_expiry", "encode_position", "DEFAULT_TIMEOUT_S", "EXIT_TIMEOUT"]

DEFAULT_TIMEOUT_S = 300.0
EXIT_TIMEOUT = 124             # the job's exit status after a time-out (as coreutils' timeout)
_TAG = 1
_MESSAGE_BYTES = 2048
_SERVE_INTERVAL = 0.05         # seconds between checks for another rank's time-out report while waiting
_SPIN = 1.0                    # seconds of back-to-back tests before waits sleep between tests
_SLEEP = 1e-3
_ABORT_DELAY = 1.5             # seconds between a rank's report and its abort


class WatchdogTimeout(RuntimeError):
    """A wait passed timeout_s (raised instead of aborting when the Watchdog was made with abort=False)."""


@dataclass(frozen=True)
class Operation:
    """One wait: `what` it is for, a `key` equal on every rank taking part in the same operation, and the world
    ranks expected to take part (`peers`: a collective's members, or a message's other end)."""
    what: str
    key: tuple = ()
    peers: tuple = ()
    where: str = ""              # trace.where() when the operation started, e.g. "step 12"

    def label(self):
        return f"{self.what} ({self.where})" if self.where else self.what


def operation(what, key=(), peers=()):
    """An Operation started now (it records where the run is)."""
    return Operation(what, tuple(key), tuple(peers), trace.where())


class Watchdog:
    """Bounds waits by `timeout_s` seconds (None: unbounded) for the world rank `rank` of `size`.

    comm: an mpi4py communicator over all ranks used for nothing else (None in a one-process world);
    lock: the lock every MPI call of the process holds. abort=False raises WatchdogTimeout instead of ending
    the job (tests).
    """

    def __init__(self, comm, rank, size, lock, timeout_s=DEFAULT_TIMEOUT_S, abort=True, grace_s=None):
        self._comm, self.rank, self.size, self._lock = comm, rank, size, lock
        self.timeout_s = timeout_s
        self.abort = abort
        self._grace_s = grace_s
        self._sends = []            # (request, buffer) of position messages: kept alive, never waited for

    @property
    def grace_s(self):
        """Seconds to collect the other ranks' positions after a time-out."""
        if self._grace_s is not None:
            return self._grace_s
        return min(10.0, max(2.0, 0.1 * (self.timeout_s or 0)))

    def wait(self, handle, op, sleep=None):
        """Test `handle` until it completes; past timeout_s (or on another rank's report) report and abort.
        sleep: seconds between tests (default: none for a second, then a millisecond)."""
        start = time.monotonic()
        deadline = None if self.timeout_s is None else start + self.timeout_s
        next_check = start + _SERVE_INTERVAL
        while not handle.test():
            now = time.monotonic()
            waited = now - start
            if now >= next_check:
                next_check = now + _SERVE_INTERVAL
                notice = self._receive_position()
                if notice is not None:
                    self.expire(op, waited, notice)
            if deadline is not None and now >= deadline:
                self.expire(op, waited)
            time.sleep(sleep or (_SLEEP if waited > _SPIN else 0))

    # ---- after a time-out ------------------------------------------------------------------------
    def expire(self, op, waited, notice=None):
        """Exchange positions with the live ranks, print the report, end the job (or raise)."""
        mine = {"rank": self.rank, "what": op.label(), "key": list(op.key), "waited": waited}
        positions = self._exchange(mine, notice)
        line = describe_expiry(mine, op.peers, positions, self.size, self.timeout_s, self.grace_s, notice)
        if not self.abort:
            raise WatchdogTimeout(line)
        sys.stdout.flush()
        sys.stderr.flush()
        os.write(sys.stderr.fileno(), (line + "\n").encode())   # one write: other ranks' reports share the pipe
        time.sleep(_ABORT_DELAY)     # NOTE (abort delay), and time for the launcher to forward the output
        from mpi4py import MPI

        (self._comm or MPI.COMM_WORLD).Abort(EXIT_TIMEOUT)

    def _exchange(self, mine, notice):
        """{world rank: position} of every rank that answered within grace_s (this rank's own included)."""
        positions = {self.rank: mine}
        if notice is not None:
            positions[notice["rank"]] = notice
        if self._comm is None:
            return positions
        self._send_to_all(mine)
        end = time.monotonic() + self.grace_s
        while len(positions) < self.size and time.monotonic() < end:
            got = self._receive_position()
            if got is None:
                time.sleep(0.01)
            else:
                positions[got["rank"]] = got
        return positions

    def _send_to_all(self, position):
        buffer = np.zeros(_MESSAGE_BYTES, dtype=np.uint8)
        data = encode_position(position)
        buffer[:len(data)] = np.frombuffer(data, dtype=np.uint8)
        with self._lock:
            for rank in range(self.size):
                if rank != self.rank:
                    self._sends.append((self._comm.Isend(buffer, dest=rank, tag=_TAG), buffer))

    def _receive_position(self):
        """Another rank's position message, if one has arrived (None otherwise, and in a one-process world)."""
        if self._comm is None:
            return None
        from mpi4py import MPI

        status = MPI.Status()
        with self._lock:
            if not self._comm.Iprobe(source=MPI.ANY_SOURCE, tag=_TAG, status=status):
                return None
            buffer = np.zeros(_MESSAGE_BYTES, dtype=np.uint8)
            self._comm.Recv(buffer, source=status.Get_source(), tag=_TAG)
        return json.loads(buffer.tobytes().rstrip(b"\0").decode())


def encode_position(position):
    """A position message as JSON of at most _MESSAGE_BYTES: a longer description of the operation ("what") is
    cut short, so that the message stays whole JSON for the ranks that read it."""
    data = json.dumps(position).encode()
    what = str(position.get("what", ""))
    while len(data) > _MESSAGE_BYTES and what:
        what = what[:max(0, len(what) - (len(data) - _MESSAGE_BYTES) - 3)]
        data = json.dumps({**position, "what": what + "..."}).encode()
    if len(data) > _MESSAGE_BYTES:
        raise ValueError(f"watchdog: a position message of {len(data)} bytes does not fit {_MESSAGE_BYTES}: {position}")
    return data


def describe_expiry(mine, peers, positions, size, timeout_s, grace_s, notice=None):
    """The one line a rank prints after a time-out.

    mine, positions[r]: {"rank", "what", "key", "waited"}; peers: the world ranks of this rank's operation;
    notice: the position of the rank whose time-out this rank heard of (None: this rank timed out itself).
    """
    me = mine["rank"]
    head = f"[rank {me} of {size}] watchdog: "
    if notice is None:
        head += (f"{mine['what']} did not complete within {timeout_s:g} s ([parallel] timeout_s)")
    else:
        head += (f"rank {notice['rank']} timed out in {notice['what']}; this rank has waited "
                 f"{mine['waited']:.1f} s in {mine['what']}")
    arrived, missing = [], []
    for rank in sorted(set(peers) - {me}):
        theirs = positions.get(rank)
        if theirs is not None and theirs["key"] == mine["key"]:
            arrived.append(str(rank))
        elif theirs is None:
            missing.append(f"rank {rank} (no answer within {grace_s:g} s: stopped, hung, busy or dead)")
        else:
            missing.append(f"rank {rank} (waiting {theirs['waited']:.1f} s in {theirs['what']})")
    parts = [head, "not arrived: " + ("; ".join(missing) if missing else "none")]
    if arrived:
        parts.append("waiting in it too: rank" + ("s " if len(arrived) > 1 else " ") + ", ".join(arrived))
    return "; ".join(parts) + ". Aborting the job."
