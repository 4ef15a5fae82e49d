"""Membership on one server: which workers are live, their clocks and epochs, heartbeats and time-outs.

Any message from a worker on the connection it joined on counts as a heartbeat. A worker silent for longer
than `timeout` seconds is dropped: it stops counting for ssp's slowest clock and for sync's barrier. A dropped
worker that comes back gets a "not_joined" error and joins again (pulling the current parameters).

The server remembers, for every worker it has seen (live, dropped, departed, or in the snapshot it restored),
its clock and `last_push`: the clock of its latest push this server's state holds. A worker that joins again
is told both, so it can tell whether the push it was waiting on when it lost the server was applied (then it
is not sent again) or not (then it is): no push is applied twice and none is dropped.

Observers (monitoring tools, benchmarks, a finished worker reading the final parameters) may read but never
push; they have no clock that others wait for and are never dropped.
"""
from dataclasses import dataclass

__all__ = ["WorkerState", "Membership"]


@dataclass
class WorkerState:
    id: int
    identity: bytes        # the ZMQ routing id of the connection it joined on (its requests must use it)
    clock: int             # the clock its next push must carry
    epoch: int             # epochs it had completed at its latest push
    last_seen: float       # time.monotonic() of its latest message
    last_push: int = None  # clock of its latest push held in this server's state (None: none)


class Membership:
    def __init__(self, timeout):
        if not timeout > 0:
            raise ValueError(f"heartbeat timeout must be > 0 seconds, got {timeout!r}")
        self.timeout = float(timeout)
        self.workers = {}               # id -> WorkerState (live, non-observer)
        self.observers = {}             # id -> routing identity
        self.dropped = []               # ids dropped by the timeout, in order (for stats and logs)
        self.remembered = {}            # id -> (clock, last_push) of workers not live now

    def join(self, worker, identity, clock, epoch, now, last_push=None):
        state = self.workers.get(worker)
        if state is None:
            state = self.workers[worker] = WorkerState(worker, identity, clock, epoch, now, last_push)
            self.remembered.pop(worker, None)
        else:
            state.identity, state.last_seen = identity, now
        return state

    def join_observer(self, worker, identity):
        self.observers[worker] = identity

    def leave(self, worker):
        self.observers.pop(worker, None)
        state = self.workers.pop(worker, None)
        if state is not None:
            self._remember(state)
        return state is not None

    def get(self, worker):
        return self.workers.get(worker)

    def recall(self, worker):
        """(clock, last_push) of a worker seen before and not live now, or None."""
        return self.remembered.get(worker)

    def touch(self, worker, now):
        state = self.workers.get(worker)
        if state is not None:
            state.last_seen = now

    def expire(self, now):
        """Drop every worker silent for more than the timeout; returns their ids."""
        gone = [w for w, s in self.workers.items() if now - s.last_seen > self.timeout]
        for w in gone:
            self._remember(self.workers.pop(w))
            self.dropped.append(w)
        return gone

    def _remember(self, state):
        self.remembered[state.id] = (state.clock, state.last_push)

    def joined_on(self, identity):
        """True when a live worker or an observer joined on the connection `identity`."""
        return identity in self.observers.values() or any(s.identity == identity for s in self.workers.values())

    def live(self):
        return list(self.workers)

    def min_clock(self):
        """The slowest live worker's clock, or None when no worker is live."""
        return min((s.clock for s in self.workers.values()), default=None)

    def min_epoch(self):
        return min((s.epoch for s in self.workers.values()), default=None)

    def clocks(self):
        return {w: s.clock for w, s in self.workers.items()}

    def history(self, last_push_cap=None):
        """{id: [clock, last_push]} of every worker seen (live or not), for snapshots. last_push_cap: the
        largest last_push the snapshot's parameters hold (sync mode: the last completed round)."""
        out = {w: [c, p] for w, (c, p) in self.remembered.items()}
        out.update({w: [s.clock, s.last_push] for w, s in self.workers.items()})
        if last_push_cap is not None:
            for entry in out.values():
                if entry[1] is not None and entry[1] > last_push_cap:
                    entry[1] = last_push_cap if last_push_cap >= 0 else None
        return out

    def restore_history(self, history):
        """Remember the workers of a snapshot's history() (all not live: they join again)."""
        self.remembered = {int(w): (c, p) for w, (c, p) in history.items()}
