"""Consistency models: when a server may answer a worker's read, and how sync mode combines gradients.

A worker's *clock* on a server is the number of its pushes that server has accepted. A worker at clock c
reads (pulls) the parameters it will compute its step c + 1 with. With m the smallest clock among the live
workers (dropped and departed workers do not count):

    async   every read is answered at once: workers never wait for each other (Hogwild-style, stale reads).
    ssp     bounded staleness s: a read at clock c is answered once c - m <= s, i.e. a worker more than s
            clocks ahead of the slowest live worker waits (Ho et al., NIPS 2013). s = 0 is a barrier without
            averaging: every worker's update is applied on its own, but nobody runs ahead. A read *ahead*
            (the worker overlaps its push with the next step, so the values serve the step after next) counts
            as a read at c + 1: overlap keeps the bound s; it needs s >= 1.
    sync    a barrier per step: the gradients of one clock from every live worker are averaged and applied as
            one update, then the reads of the next clock are answered. With equal per-worker batches this is
            single-process SGD on the combined batch (the mean of the per-worker mean losses is the mean loss
            of all tokens); with one worker it is exactly local training.

NOTE: a worker dropped by the heartbeat timeout or that leaves stops counting at once: m is recomputed and a
sync round completes without it (its gradient, if it already pushed one for the round, is kept). So neither
ssp nor sync ever waits forever on a dead worker.
"""
import numpy as np

__all__ = ["MODES", "Consistency", "SyncRound"]

MODES = ("async", "ssp", "sync")


class Consistency:
    def __init__(self, mode, staleness=0):
        if mode not in MODES:
            raise ValueError(f"consistency must be one of {MODES}, got {mode!r}")
        if isinstance(staleness, bool) or not isinstance(staleness, int) or staleness < 0:
            raise ValueError(f"staleness must be an int >= 0, got {staleness!r}")
        self.mode = mode
        self.staleness = staleness if mode == "ssp" else 0

    def may_read(self, clock, min_clock, applied_round):
        """May a read at `clock` be answered now? min_clock: the slowest live worker's clock (None: none live);
        applied_round: sync mode's number of completed rounds."""
        if self.mode == "async":
            return True
        if self.mode == "ssp":
            return min_clock is None or clock - min_clock <= self.staleness
        return clock <= applied_round

    @property
    def allows_ahead(self):
        """May a worker overlap a push with its next step (read one clock ahead)? Not where the read would
        wait for that worker's own next push: sync, and ssp with staleness 0."""
        return self.mode == "async" or (self.mode == "ssp" and self.staleness >= 1)

    @property
    def aggregates(self):
        """True when pushes are summed into rounds instead of being applied one by one."""
        return self.mode == "sync"

    def __repr__(self):
        return f"Consistency({self.mode!r}" + (f", staleness={self.staleness})" if self.mode == "ssp" else ")")


class SyncRound:
    """The gradients of one sync round: a per-key sum and the set of workers that contributed.

    A worker's push may hold no gradient for some keys (no_grad). As data mode's allreduce does (a rank without
    a gradient adds zeros, the sum is divided by every rank), a key's mean is its sum over the workers that
    sent it divided by all the round's workers; a key no worker sent has no mean and is not updated.
    """

    def __init__(self, number):
        self.number = number
        self.contributors = set()
        self.sums = {}                      # key -> float array (the server's dtype)

    def add(self, worker, grads):
        """grads: {key: array}. The first contribution is copied (the arrays are views of a ZMQ frame)."""
        for key, g in grads.items():
            total = self.sums.get(key)
            if total is None:
                self.sums[key] = np.array(g, copy=True)
            else:
                total += g
        self.contributors.add(worker)

    def complete(self, live_workers):
        """True once every live worker contributed (and at least one did)."""
        return bool(self.contributors) and set(live_workers) <= self.contributors

    def mean(self):
        """{key: sum / number of contributors}: the averaged gradient of the round."""
        n = len(self.contributors)
        return {key: total / n for key, total in self.sums.items()}
