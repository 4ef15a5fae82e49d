"""[memory] budget_mb: a long-window job that does not fit without activation checkpointing fits with it."""
import pytest

from disttrain.train import Trainer
from disttrain.train.loop import MemoryBudgetExceeded

LONG_WINDOW = ("data.bptt=256", "data.batch_size=2", "train.max_steps=2", "train.log_every=1")


def _first_step_peak(spec):
    """(the step's own peak, the process's whole peak: parameters, gradients and optimizer state included)."""
    trainer = Trainer.from_job(spec, progress=False)
    inputs, targets = next(iter(trainer.train_iter))
    trainer._metered_step(inputs, targets)
    return trainer._acc["peak_mem_bytes"], trainer.measured_peak_bytes


def test_checkpointing_fits_a_budget_the_plain_job_exceeds(tiny_job):
    (plain_step, plain), (sqrt_step, sqrt) = (
        _first_step_peak(tiny_job(*LONG_WINDOW, *extra, hidden=64))
        for extra in ((), ("memory.activation_checkpointing=sqrt",)))
    assert sqrt_step < 0.75 * plain_step, (sqrt_step, plain_step)
    held = plain - plain_step                   # parameters and optimizer state: the budget counts them too
    assert held > 0 and sqrt - sqrt_step == held
    budget_mb = (plain + sqrt) / 2 / 2**20
    over = tiny_job(*LONG_WINDOW, f"memory.budget_mb={budget_mb}", hidden=64)
    with pytest.raises(MemoryBudgetExceeded, match=r"budget_mb.*activation_checkpointing = 'none'"):
        Trainer.from_job(over, progress=False).fit()
    fits = tiny_job(*LONG_WINDOW, f"memory.budget_mb={budget_mb}", "memory.activation_checkpointing=sqrt", hidden=64)
    Trainer.from_job(fits, progress=False).fit()   # trains to max_steps within the budget


@pytest.mark.parametrize("extra", [(), ("memory.activation_checkpointing=sqrt",)])
def test_the_step_meter_counts_what_a_scan_of_every_object_counts(tiny_job, monkeypatch, extra):
    """The Trainer hands the meter its resident tensors (parameters, gradients, carried state) instead of
    scanning every Python object: the step's figure must not change (steps 2 and 3 start with grads and state)."""
    def peaks(scan):
        if scan:
            monkeypatch.setattr(Trainer, "_resident_tensors", lambda self: None)
        trainer = Trainer.from_job(tiny_job("train.log_every=1", *extra, layers=2), progress=False)
        batches = iter(trainer.train_iter)
        figures = []
        for _ in range(3):
            trainer._metered_step(*next(batches))
            figures.append(trainer._acc["peak_mem_bytes"])
        monkeypatch.undo()
        return figures

    assert peaks(scan=False) == peaks(scan=True)
