"""[train] on_nonfinite: a NaN or infinite loss or gradient norm is caught on its step; "stop" ends the run with
TrainingDiverged, "skip" drops that step's update; no non-finite checkpoint and no temporary directory is ever
written; metrics.jsonl stays strict JSON and curves.png shows the steps before."""
import json
import math

import numpy as np
import pytest

from disttrain.train import Trainer, load_checkpoint
from disttrain.train.loop import MAX_SKIPS_IN_A_ROW, TrainingDiverged
from disttrain.train.mode import LocalMode


class Poisoned(LocalMode):
    """What a diverging run produces, on chosen steps (1-based): a NaN loss and/or NaN gradients."""

    def __init__(self, steps, loss=True, grads=True):
        self.steps, self.loss, self.grads = set(steps), loss, grads
        self.weights_before = {}            # step -> the weights it started from
        self.step_now = 0

    def forward_backward(self, inputs, targets, state=None, backward_scale=1.0):
        self.step_now += 1
        self.weights_before[self.step_now] = weights(self)
        loss, state = super().forward_backward(inputs, targets, state, backward_scale)
        if self.step_now in self.steps:
            if self.grads:
                for p in self.model.parameters():
                    p.grad.data[...] = np.nan
            if self.loss:
                loss = math.nan
        return loss, state


def weights(holder):
    return {name: t.numpy().copy() for name, t in holder.model.state_dict().items()}


def assert_same(a, b):
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def strict_rows(run_dir):
    text = (run_dir / "metrics.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text
    return [json.loads(line) for line in text.splitlines()]


def files_under(run_dir):
    return sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*"))


@pytest.mark.parametrize("poison", [dict(loss=True, grads=False), dict(loss=False, grads=True)],
                         ids=["nan loss", "nan gradients"])
def test_stop_ends_the_run_at_the_step_without_applying_it(tiny_job, tmp_path, poison):
    spec = tiny_job("train.max_steps=20", "train.checkpoint_every=3")
    mode = Poisoned({8}, **poison)
    trainer = Trainer.from_job(spec, out_dir=tmp_path, mode=mode, progress=False)
    with pytest.raises(TrainingDiverged) as caught:
        trainer.fit()
    value = "loss nan, gradient norm" if poison["loss"] else "gradient norm nan"
    assert str(caught.value).startswith("step 8: ") and value in str(caught.value)
    assert str(caught.value).endswith(f'stopped ([train] on_nonfinite = "stop"); the last good checkpoint is '
                                      f'{tmp_path / "checkpoints" / "step-000006"}')
    assert caught.value.step == 8 and trainer.step == 8
    assert_same(weights(trainer), mode.weights_before[8])            # step 8's update was not applied
    assert load_checkpoint(tmp_path).meta["step"] == 6
    assert not [f for f in files_under(tmp_path) if f.endswith((".tmp", ".prev"))]
    rows = strict_rows(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, 9))                # logged up to the bad step
    assert rows[-1]["loss"] is None and rows[-1]["skipped_steps"] == 1
    assert all(math.isfinite(r["loss"]) for r in rows[:-1])
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_stop_before_any_checkpoint_says_so(tiny_job, tmp_path):
    trainer = Trainer.from_job(tiny_job("train.max_steps=20", "train.checkpoint_every=10"), out_dir=tmp_path / "run",
                      mode=Poisoned({2}), progress=False)
    with pytest.raises(TrainingDiverged, match="^step 2: loss nan, gradient norm nan: not finite; .*; no checkpoint "
                                               "was written before it$"):
        trainer.fit()
    assert files_under(tmp_path / "run") == ["config.toml", "curves.png", "memory.json", "metrics.jsonl"]


def test_skip_drops_the_update_logs_it_and_goes_on(tiny_job, tmp_path, capsys):
    spec = tiny_job("train.max_steps=9", "train.checkpoint_every=4", "train.keep_checkpoints=3",
                    "train.on_nonfinite=skip", "optim.warmup_steps=20")
    mode = Poisoned({3, 4, 7})
    trainer = Trainer.from_job(spec, out_dir=tmp_path, mode=mode, progress=False)
    trainer.fit()
    assert trainer.step == 9
    for step in (3, 4, 7):                                                # no update: the next step starts where
        assert_same(mode.weights_before[step + 1], mode.weights_before[step])   # the skipped one did
    assert_same(load_checkpoint(tmp_path / "checkpoints" / "step-000004").model, mode.weights_before[5])
    state = trainer.optimizer.state_dict()["state"]
    assert {entry["step"] for entry in state.values()} == {6}            # Adam took 9 - 3 steps
    assert trainer.schedules.step.last_epoch == 6                        # and so did the warm-up
    rows = [r for r in strict_rows(tmp_path) if r["split"] == "train"]
    assert [r["step"] for r in rows if r.get("skipped_steps")] == [3, 4, 7] and rows[2]["loss"] is None
    assert rows[3]["lr"] == rows[4]["lr"] < rows[5]["lr"]                 # the skipped steps' lr was not advanced
    printed = capsys.readouterr().out
    assert 'step 3: loss nan, gradient norm nan: update skipped ([train] on_nonfinite = "skip", 1 in a row)' in printed
    assert '"skip", 2 in a row' in printed and '"skip", 3 in a row' not in printed


def test_skip_stops_after_ten_skips_in_a_row(tiny_job, tmp_path):
    trainer = Trainer.from_job(tiny_job("train.max_steps=40", "train.checkpoint_every=4", "train.on_nonfinite=skip"),
                      out_dir=tmp_path, mode=Poisoned(range(6, 40)), progress=False)
    with pytest.raises(TrainingDiverged, match=rf"^step {5 + MAX_SKIPS_IN_A_ROW}: loss nan, gradient norm nan: not "
                                               rf"finite; stopped after 10 skipped steps in a row .*step-000012$"):
        trainer.fit()
    assert MAX_SKIPS_IN_A_ROW == 10 and trainer.step == 15
    assert [p.name for p in sorted((tmp_path / "checkpoints").iterdir())] == ["step-000008", "step-000012"]


def test_a_checkpoint_of_nonfinite_weights_is_never_written(tiny_job, tmp_path):
    trainer = Trainer.from_job(tiny_job("train.max_steps=2"), out_dir=tmp_path, progress=False)
    trainer.fit()
    before = files_under(tmp_path)
    name, param = next(iter(trainer.model.named_parameters()))
    param.data[0, 0] = np.inf
    with pytest.raises(TrainingDiverged, match=rf"^step 2: weight {name} is inf; not writing a checkpoint; the last "
                                               r"good checkpoint is .*step-000002$"):
        trainer.save_checkpoint()
    assert files_under(tmp_path) == before
