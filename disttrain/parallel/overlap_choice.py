"""overlap="auto" for data parallelism: time whole training steps with the bucket allreduces overlapped
with backward and after it, then keep the faster for the rest of the run.

Whether overlap pays depends on the machine. Where a network adapter moves the data, it hides the
communication behind backward. With shared-memory MPI on a few cores, the copies compete with backward
for the same cores, and reducing after backward can give the shorter step (benchmarks/RESULTS.md, data
parallelism).

So the first steps are trials: `warmup` steps overlapped and not timed (first-touch allocations), then
steps alternating between the two modes until each has `trials` timed steps. A step's time runs from the
end of one synchronize() to the end of the next, so it includes the slower backward that overlap may
cause. Each rank takes the median of each mode, one small Allreduce (max: the slowest rank sets the
pace) makes every rank see the same figures, and every rank picks the same mode. Overlap stays unless
after-backward is faster by more than `margin`.

The mode never changes the numbers: each bucket's allreduce sums the same values in the same order
either way (tests/mpi checks that the parameters equal those of an overlapped run bit for bit).
"""
import time

import numpy as np

__all__ = ["OverlapChoice"]


class OverlapChoice:
    """Decides overlap=True/False from timed trial steps; `next_mode` is called at the end of each synchronize()."""

    def __init__(self, comm, warmup=2, trials=3, margin=0.02, clock=time.perf_counter):
        if warmup < 1 or trials < 1:
            raise ValueError(f"overlap='auto' needs warmup >= 1 and trials >= 1, got {warmup} and {trials}")
        self.comm = comm
        self.warmup, self.trials, self.margin = warmup, trials, margin
        self.clock = clock
        self.times = {True: [], False: []}  # seconds per step, by overlap mode
        self.steps = 0                      # synchronize() calls seen
        self._last_end = None
        self.chosen = None                  # the mode kept, once decided
        self.medians = None                 # {mode: the slowest rank's median step time}

    def next_mode(self, used):
        """The overlap mode for the next step, given the mode the step that just ended used."""
        now = self.clock()
        self.steps += 1
        if self.chosen is not None:
            return self.chosen
        if self.steps > self.warmup:
            self.times[used].append(now - self._last_end)
        self._last_end = now
        if min(len(t) for t in self.times.values()) >= self.trials:
            return self._agree()
        return self.steps % 2 == 0 if self.steps >= self.warmup else True

    def _agree(self):
        medians = np.array([np.median(self.times[True]), np.median(self.times[False])])
        self.comm.Allreduce(medians, op="max", what="allreduce of overlap trial times")
        self.medians = {True: float(medians[0]), False: float(medians[1])}
        self.chosen = not medians[1] < medians[0] * (1 - self.margin)
        return self.chosen

    def describe(self):
        """One line on the decision, for the job log."""
        if self.chosen is None:
            return "overlap='auto': still measuring"
        ms = {mode: 1e3 * t for mode, t in self.medians.items()}
        kept = "overlapped with backward" if self.chosen else "after backward"
        return (f"data parallel, overlap='auto': gradients reduced {kept} (median step {ms[True]:.1f} ms "
                f"overlapped, {ms[False]:.1f} ms after backward, slowest rank, {self.trials} trial steps each)")
