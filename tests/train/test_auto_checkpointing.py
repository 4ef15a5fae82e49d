"""[memory] activation_checkpointing = "auto": the job needs budget_mb, the Trainer plans before training, the run
stays under the budget and computes the losses of a "none" run; no plan fitting is an error before training."""
import re

import pytest

from disttrain import nn
from disttrain.data.source import WHOLE
from disttrain.models import protocol
from disttrain.train import Trainer
from disttrain.train.auto_checkpointing import held_bytes, plan_checkpointing
from disttrain.train.build import build_data, build_optimizer
from disttrain.train.memory_plan import Holding
from disttrain.train.jobspec import JobSpecError

LONG_WINDOW = ("data.bptt=128", "data.batch_size=2", "train.max_steps=3", "train.log_every=1")


def _held(trainer):
    """Bytes of parameters and optimizer state the budget covers besides the step."""
    return held_bytes(trainer.model, trainer.optimizer, trainer.mode.memory_holding())


def _losses_and_peaks(spec):
    trainer = Trainer.from_job(spec, progress=False)
    batches = iter(trainer.train_iter)
    losses, peaks = [], []
    for _ in range(3):
        loss, _ = trainer._metered_step(*next(batches))
        losses.append(loss)
        peaks.append(trainer._acc["peak_mem_bytes"])
    return trainer, losses, peaks


def test_auto_needs_a_budget(tiny_job):
    with pytest.raises(JobSpecError, match=r'tiny.toml: .*\[memory\] activation_checkpointing = "auto" needs '
                                           r"\[memory\] budget_mb") as raised:
        tiny_job("memory.activation_checkpointing=auto")
    assert "\n" not in str(raised.value)


def test_a_budget_the_parameters_and_optimizer_state_fill_is_an_error(tiny_job):
    spec = tiny_job(*LONG_WINDOW, "memory.activation_checkpointing=auto", "memory.budget_mb=0.001")
    with pytest.raises(JobSpecError, match=r"tiny.toml: \[memory\] budget_mb = 0.001: the parameters and "
                                           r"optimizer state alone take .* MiB"):
        Trainer.from_job(spec, progress=False)


class _NoChain(nn.Module):
    """A model of one's own with no checkpoint_segments setting, nn.LSTM or nn.Sequential: nothing to plan."""

    def __init__(self, vocab_size):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, 8)
        self.decoder = nn.Linear(8, vocab_size)

    def forward(self, tokens):
        return self.decoder(self.embedding(tokens).reshape((-1, 8)))


def test_auto_on_a_model_with_nothing_to_checkpoint_is_one_line_naming_the_model(tiny_job):
    spec = tiny_job("memory.activation_checkpointing=auto", "memory.budget_mb=100")
    data = build_data(spec)
    model = _NoChain(data.vocab_size)
    with pytest.raises(JobSpecError, match=r'tiny.toml: \[memory\] activation_checkpointing = "auto": _NoChain has '
                                           r"no nn.LSTM, no checkpoint_segments setting and no nn.Sequential") as raised:
        plan_checkpointing(spec, model, data, WHOLE, Holding(), build_optimizer(spec, model.parameters()))
    assert "\n" not in str(raised.value)


def test_auto_is_refused_for_a_pipeline_stage(tiny_job):
    with pytest.raises(JobSpecError, match=r'activation_checkpointing = "auto" plans a whole model\'s step, not a '
                                           r"pipeline stage's; .* use \[parallel\] stage_checkpointing"):
        tiny_job("memory.activation_checkpointing=auto", "memory.budget_mb=10", "parallel.mode=pipeline")


def test_auto_keeps_the_run_under_the_budget_with_the_losses_of_none(tiny_job):
    plain, plain_losses, plain_peaks = _losses_and_peaks(tiny_job(*LONG_WINDOW, hidden=32))
    held = _held(plain)
    budget_mb = (held + 0.7 * plain_peaks[0]) / 2**20      # the whole process: held state + the step
    trainer, losses, peaks = _losses_and_peaks(
        tiny_job(*LONG_WINDOW, "memory.activation_checkpointing=auto", f"memory.budget_mb={budget_mb}", hidden=32))
    choice = trainer.checkpoint_choice
    assert any(s.recompute for s in choice.plan.segments) and choice.unit == "time steps"
    carried = sum(t.data.nbytes for t in protocol.state_tensors(trainer.state))   # (h, c), alive every step
    assert choice.held == held + carried and held > 0 and carried > 0
    assert held + max(peaks) <= budget_mb * 2**20, (held, peaks, budget_mb * 2**20, choice.describe())
    assert losses == pytest.approx(plain_losses, rel=1e-5)


def test_the_plan_and_then_the_measured_peak_are_logged(tiny_job, capsys):
    spec = tiny_job(*LONG_WINDOW, "memory.activation_checkpointing=auto", "memory.budget_mb=0.5", hidden=32)
    trainer = Trainer.from_job(spec, progress=False)
    trainer.fit()
    lines = capsys.readouterr().out.splitlines()
    plan = [line for line in lines if line.startswith("activation checkpointing for [memory] budget_mb = 0.5: auto: ")]
    assert len(plan) == 1 and "predicted step peak" in plan[0] and "predicted extra time" in plan[0], lines
    assert trainer.checkpoint_choice.plan.describe("time steps") in plan[0]
    measured = [line for line in lines if line.startswith("activation checkpointing: step 1 measured peak ")]
    choice = trainer.checkpoint_choice
    assert len(measured) == 1 and measured[0].endswith(
        f"predicted {choice.peak / 2**20:.2f} MiB ({(choice.held + choice.peak) / 2**20:.2f} MiB in all)")
    assert re.search(r" measured peak [0-9.]+ MiB \([0-9.]+ MiB in all\), predicted ", measured[0]), measured[0]


def test_no_plan_fitting_is_an_error_before_training_naming_the_smallest_budget(tiny_job, tmp_path):
    held = _held(Trainer.from_job(tiny_job(*LONG_WINDOW), progress=False))
    budget_mb = round((held + 1000) / 2**20, 4)
    spec = tiny_job(*LONG_WINDOW, "memory.activation_checkpointing=auto", f"memory.budget_mb={budget_mb}")
    with pytest.raises(JobSpecError, match=rf"tiny.toml: \[memory\] budget_mb = {budget_mb:g}: no activation "
                                           r"checkpointing plan .* the smallest feasible budget is "
                                           r"budget_mb = ") as raised:
        Trainer.from_job(spec, out_dir=tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
    smallest = float(str(raised.value).rsplit("= ", 1)[1])
    fits = tiny_job(*LONG_WINDOW, "memory.activation_checkpointing=auto", f"memory.budget_mb={smallest}")
    Trainer.from_job(fits, progress=False).fit()      # trains within it (the step meter checks every log step)
