"""overlap="auto" (disttrain.parallel.overlap_choice) on a fake clock: which modes the trial steps use,
which step times count, and the decision the slowest rank's medians give."""
import numpy as np
import pytest

from disttrain.parallel.overlap_choice import OverlapChoice
from disttrain.train.jobspec import JobSpecError, loads_job


class SlowerPeer:
    """One other rank whose medians are `factor` times ours: Allreduce(max) returns the larger."""

    def __init__(self, factor=1.0):
        self.factor = factor

    def Allreduce(self, buf, op="sum", what=None):
        assert op == "max"
        np.maximum(buf, buf * self.factor, out=buf)
        return buf


def run(step_ms, comm=None, steps=12, **kw):
    """Feed OverlapChoice steps taking step_ms[mode] milliseconds; returns the modes the steps used."""
    now = [0.0]
    choice = OverlapChoice(comm or SlowerPeer(), clock=lambda: now[0], **kw)
    mode, modes = True, []
    for _ in range(steps):
        modes.append(mode)
        now[0] += step_ms[mode] / 1e3
        mode = choice.next_mode(mode)
    return choice, modes


def test_trials_alternate_after_the_warmup_then_the_faster_mode_stays():
    choice, modes = run({True: 41.0, False: 36.0})
    assert modes[:8] == [True, True, True, False, True, False, True, False]
    assert choice.chosen is False and modes[8:] == [False] * 4
    assert choice.times == {True: pytest.approx([0.041] * 3), False: pytest.approx([0.036] * 3)}
    assert "after backward" in choice.describe() and "41.0 ms overlapped, 36.0 ms after backward" in choice.describe()


def test_overlap_stays_unless_after_backward_wins_by_the_margin():
    assert run({True: 40.0, False: 39.6})[0].chosen is True    # 1% faster: within the 2% margin
    assert run({True: 30.0, False: 45.0})[0].chosen is True


def test_the_slowest_rank_sets_the_figures():
    choice, _ = run({True: 10.0, False: 9.0}, comm=SlowerPeer(2.0))
    assert choice.medians == {True: pytest.approx(0.020), False: pytest.approx(0.018)}


def test_the_warmup_steps_are_not_timed():
    choice, _ = run({True: 10.0, False: 12.0}, warmup=4, trials=2, steps=9)
    assert sum(len(t) for t in choice.times.values()) == 4 and choice.chosen is True
    with pytest.raises(ValueError, match="warmup >= 1"):
        OverlapChoice(SlowerPeer(), warmup=0)


def test_job_spec_takes_true_false_or_auto():
    base = '[data]\nkind = "default_corpus"\n[parallel]\nmode = "data"\n'
    assert loads_job(base).parallel.overlap == "auto"
    assert loads_job(base + "overlap = false\n").parallel.overlap is False
    with pytest.raises(JobSpecError, match="overlap"):
        loads_job(base + 'overlap = "sometimes"\n')
