"""Membership on one server: which workers are live, their clocks and epochs, heartbeats and time-outs.

Any message from a worker counts as a heartbeat. A worker silent for longer than `timeout` seconds is dropped:
it stops counting for ssp's slowest clock and for sync's barrier. A dropped worker that comes back gets a
"not_joined" error and joins again (pulling the current parameters), like a new one.

Observers (monitoring tools, benchmarks, a finished worker reading the final parameters) may read but never
push; they have no clock that others wait for and are never dropped.
"""
from dataclasses import dataclass

__all__ = ["WorkerState", "Membership"]


@dataclass
class WorkerState:
    id: int
    identity: bytes        # the ZMQ routing id of the connection it joined on (its requests must use it)
    clock: int             # pushes accepted from it
    epoch: int             # epochs it had completed at its latest push
    last_seen: float       # time.monotonic() of its latest message


class Membership:
    def __init__(self, timeout):
        if not timeout > 0:
            raise ValueError(f"heartbeat timeout must be > 0 seconds, got {timeout!r}")
        self.timeout = float(timeout)
        self.workers = {}               # id -> WorkerState (live, non-observer)
        self.observers = {}             # id -> routing identity
        self.dropped = []               # ids dropped by the timeout, in order (for stats and logs)

    def join(self, worker, identity, clock, epoch, now):
        state = self.workers.get(worker)
        if state is None:
            state = self.workers[worker] = WorkerState(worker, identity, clock, epoch, now)
        else:
            state.identity, state.last_seen = identity, now
        return state

    def join_observer(self, worker, identity):
        self.observers[worker] = identity

    def leave(self, worker):
        self.observers.pop(worker, None)
        return self.workers.pop(worker, None) is not None

    def get(self, worker):
        return self.workers.get(worker)

    def touch(self, worker, now):
        state = self.workers.get(worker)
        if state is not None:
            state.last_seen = now

    def expire(self, now):
        """Drop every worker silent for more than the timeout; returns their ids."""
        gone = [w for w, s in self.workers.items() if now - s.last_seen > self.timeout]
        for w in gone:
            del self.workers[w]
            self.dropped.append(w)
        return gone

    def live(self):
        return list(self.workers)

    def min_clock(self):
        """The slowest live worker's clock, or None when no worker is live."""
        return min((s.clock for s in self.workers.values()), default=None)

    def min_epoch(self):
        return min((s.epoch for s in self.workers.values()), default=None)

    def clocks(self):
        return {w: s.clock for w, s in self.workers.items()}
