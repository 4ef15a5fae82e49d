"""The training loop's TBPTT: state carried and detached across segments, reset per epoch, token-weighted eval."""
import math

import numpy as np
import pytest

import disttrain as dt
from disttrain.data import TBPTTIterator, batchify
from disttrain.models import LSTMLanguageModel
from disttrain.nn import functional as F
from disttrain.train import Trainer
from disttrain.train.loop import EVAL_BATCH_SIZE


def _loss(model, inputs, targets, state=None):
    logits, state = model(dt.tensor(inputs), state)
    return F.cross_entropy(logits, dt.tensor(targets.reshape(-1))), state


@pytest.mark.parametrize("bptt", [1, 5, 7, 100])
def test_segments_carrying_state_equal_one_long_forward(bptt):
    dt.manual_seed(0)
    model = LSTMLanguageModel(13, hidden=6, layers=2, init_scale=0.3).double().eval()
    ids = np.random.default_rng(1).integers(0, 13, 203)
    streams = batchify(ids, 3)                                  # (67, 3)
    with dt.no_grad():
        whole, _ = _loss(model, streams[:-1], streams[1:])
        total, tokens, state = 0.0, 0, None
        for inputs, targets in TBPTTIterator(streams, bptt):
            loss, state = _loss(model, inputs, targets, state)
            total += loss.item() * targets.size
            tokens += targets.size
    assert tokens == (streams.shape[0] - 1) * streams.shape[1]
    assert total / tokens == pytest.approx(whole.item(), rel=1e-13, abs=0)


def test_train_step_carries_the_detached_state(tiny_job):
    trainer = Trainer.from_job(tiny_job(layers=2), progress=False)
    (x1, y1), (x2, y2) = trainer.train_iter.segment(0), trainer.train_iter.segment(1)
    with dt.no_grad():
        expected_loss, expected_state = _loss(trainer.model, x1, y1)
    loss, grad_norm = trainer.train_step(x1, y1)
    assert loss == pytest.approx(expected_loss.item(), rel=1e-6) and grad_norm > 0
    h, c = trainer.state
    assert h.grad_fn is None and not h.requires_grad and c.grad_fn is None and not c.requires_grad
    np.testing.assert_array_equal(h.numpy(), expected_state[0].numpy())
    np.testing.assert_array_equal(c.numpy(), expected_state[1].numpy())
    # the next segment starts from that state (with the updated weights)
    with dt.no_grad():
        expected_loss, _ = _loss(trainer.model, x2, y2, trainer.state)
    assert trainer.train_step(x2, y2)[0] == pytest.approx(expected_loss.item(), rel=1e-6)


def test_state_resets_at_each_epoch_start(tiny_job):
    trainer = Trainer.from_job(tiny_job(epochs=3), progress=False)
    starts = []
    forward = trainer.model.forward

    def spy(tokens, state=None):
        if trainer.model.training:
            starts.append(state is None)
        return forward(tokens, state)

    trainer.model.forward = spy
    trainer.fit()
    per_epoch = len(trainer.train_iter)
    assert len(starts) == 3 * per_epoch == trainer.step
    assert [i for i, fresh in enumerate(starts) if fresh] == [0, per_epoch, 2 * per_epoch]


def test_evaluation_is_token_weighted_without_grad_and_in_eval_mode(tiny_job):
    trainer = Trainer.from_job(tiny_job(layers=2, dropout=0.5), progress=False)
    ids = trainer.data.corpus.valid
    streams = batchify(ids, EVAL_BATCH_SIZE)
    losses, sizes, state = [], [], None
    trainer.model.eval()
    with dt.no_grad():
        for inputs, targets in TBPTTIterator(streams, trainer.spec.data.bptt):
            loss, state = _loss(trainer.model, inputs, targets, state)
            losses.append(loss.item())
            sizes.append(targets.size)
    trainer.model.train()
    assert len(set(sizes)) > 1                                 # a shorter last segment
    result = trainer.evaluate("valid")
    assert trainer.model.training                              # mode restored
    assert result.tokens == sum(sizes)
    assert result.loss == pytest.approx(np.dot(losses, sizes) / sum(sizes), rel=1e-12)
    assert result.loss != pytest.approx(np.mean(losses), rel=1e-9)  # not segment-averaged
    assert result.ppl == pytest.approx(math.exp(result.loss)) and result.bpc == pytest.approx(result.loss / math.log(2))
    assert trainer.evaluate("valid").loss == result.loss       # no dropout, no state leak between calls
    assert all(p.grad is None for p in trainer.params)


def test_max_steps_stops_and_evaluates_valid_and_test(tiny_job):
    trainer = Trainer.from_job(tiny_job("train.max_steps=5", epochs=10), progress=False)
    evals = trainer.fit()
    assert trainer.step == 5 and trainer.epoch == 0
    assert set(evals) == {"valid", "test"} and evals["valid"].step == evals["test"].step == 5


def test_lr_schedules_per_epoch_and_warmup(tiny_job, tmp_path):
    import json

    spec = tiny_job("optim.decay_after_epoch=1", "optim.decay=0.5", "optim.warmup_steps=4", optim="sgd", lr=0.5,
                    epochs=3)
    trainer = Trainer.from_job(spec, out_dir=tmp_path / "run", progress=False)
    trainer.fit()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    per_epoch = len(trainer.train_iter)
    lrs = [r["lr"] for r in train]
    assert lrs[:4] == pytest.approx([0.125, 0.25, 0.375, 0.5])
    assert lrs[per_epoch - 1] == pytest.approx(0.5)
    assert lrs[per_epoch:2 * per_epoch] == pytest.approx([0.25] * per_epoch)
    assert lrs[2 * per_epoch:] == pytest.approx([0.125] * per_epoch)
    assert [r["epoch"] for r in train] == [1] * per_epoch + [2] * per_epoch + [3] * per_epoch
    valid = [r for r in rows if r["split"] == "valid"]
    assert [(r["step"], r["epoch"]) for r in valid] == [(per_epoch * k, k) for k in (1, 2, 3)]
    for r in train:
        assert r["bpc"] == pytest.approx(r["loss"] / math.log(2)) and r["ppl"] == pytest.approx(math.exp(r["loss"]))


def test_clipping_bounds_the_update(tiny_job):
    trainer = Trainer.from_job(tiny_job("optim.clip_norm=1e-3", optim="sgd", lr=1.0), progress=False)
    before = [p.numpy().copy() for p in trainer.params]
    _, norm = trainer.train_step(*trainer.train_iter.segment(0))
    moved = math.sqrt(sum(((p.numpy() - b) ** 2).sum() for p, b in zip(trainer.params, before)))
    assert norm > 1e-3 and moved == pytest.approx(1e-3, rel=1e-3)   # SGD lr 1: the step is the clipped gradient
