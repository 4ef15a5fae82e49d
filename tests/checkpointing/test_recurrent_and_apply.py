"""Recurrent checkpointing in nn.LSTM and apply_activation_checkpointing on whole models."""
import numpy as np
import pytest

import disttrain as dt
from disttrain import nn
from disttrain.checkpointing import apply_activation_checkpointing
from disttrain.models.lstm_lm import LSTMLanguageModel


def lstm_grads(lstm, x, hx, segments, seed=3):
    lstm.checkpoint_segments = segments
    lstm.zero_grad()
    x.grad = None
    dt.manual_seed(seed)  # dropout between layers draws the same masks in every run
    out, (h, c) = lstm(x, hx)
    (out * out).sum().backward() if hx is None else ((out * out).sum() + (h * c).sum()).backward()
    grads = [p.grad.numpy().copy() for p in lstm.parameters()] + [x.grad.numpy().copy()]
    return grads, [out.numpy().copy(), h.numpy().copy(), c.numpy().copy()]


@pytest.mark.parametrize("segments", ["sqrt", 1, 4, 37])
@pytest.mark.parametrize("with_state", [False, True])
def test_lstm_float64_gradients_equal_plain(segments, with_state):
    dt.manual_seed(0)
    lstm = nn.LSTM(5, 6, num_layers=2, dropout=0.3).double()
    x = dt.randn(37, 3, 5, dtype="float64", requires_grad=True)
    hx = (dt.randn(2, 3, 6, dtype="float64"), dt.randn(2, 3, 6, dtype="float64")) if with_state else None
    plain, out_plain = lstm_grads(lstm, x, hx, None)
    ckpt, out_ckpt = lstm_grads(lstm, x, hx, segments)
    assert max(float(np.abs(a - b).max()) for a, b in zip(plain, ckpt)) <= 1e-12
    for a, b in zip(out_plain, out_ckpt):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-14)


def test_lstm_float32_allclose_and_hooks_fire_once_per_parameter():
    dt.manual_seed(0)
    lstm = nn.LSTM(4, 8, num_layers=2, dropout=0.2)
    x = dt.randn(50, 2, 4, requires_grad=True)
    plain, _ = lstm_grads(lstm, x, None, None)
    fired = {}
    for p in lstm.parameters():
        p.register_post_accumulate_grad_hook(lambda t: fired.__setitem__(id(t), fired.get(id(t), 0) + 1))
    ckpt, _ = lstm_grads(lstm, x, None, "sqrt")
    assert sorted(fired.values()) == [1] * 8  # weights used in every segment: one final gradient each
    for a, b in zip(plain, ckpt):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


def test_lstm_option_off_or_no_grad_or_eval_records_no_checkpoint(checkpoint_nodes):
    dt.manual_seed(0)
    lstm = nn.LSTM(3, 4, checkpoint_segments="sqrt")
    assert "checkpoint_segments='sqrt'" in repr(lstm) and "checkpoint" not in repr(nn.LSTM(3, 4))
    x = dt.randn(16, 2, 3)
    out, _ = lstm(x)
    assert checkpoint_nodes(out) == 3  # 4 segments, the last one plain
    with dt.no_grad():
        out_ng, _ = lstm(x)
    lstm.checkpoint_segments = None
    out_off, _ = lstm(x)
    assert checkpoint_nodes(out_off) == 0
    np.testing.assert_allclose(out_ng.numpy(), out_off.numpy(), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="checkpoint_segments"):
        nn.LSTM(3, 4, checkpoint_segments=0)


def test_apply_to_lstm_language_model(checkpoint_nodes):
    dt.manual_seed(0)
    model = LSTMLanguageModel(vocab_size=20, hidden=8, layers=2, dropout=0.25).double()
    tokens = dt.tensor(np.random.default_rng(0).integers(0, 20, (30, 3)))
    targets = dt.tensor(np.random.default_rng(1).integers(0, 20, 90))
    nodes = {}

    def grads():
        model.zero_grad()
        dt.manual_seed(5)
        logits, _ = model(tokens)
        loss = nn.functional.cross_entropy(logits, targets)
        nodes["forward"] = checkpoint_nodes(loss)
        nodes["forward_loss"] = checkpoint_nodes(model.forward_loss(tokens, tokens)[0])
        loss.backward()
        return [p.grad.numpy().copy() for p in model.parameters()]

    plain = grads()
    assert nodes == {"forward": 0, "forward_loss": 0}
    assert apply_activation_checkpointing(model, "sqrt") is model
    assert model.checkpoint_segments == model.lstm.checkpoint_segments == "sqrt"
    ckpt = grads()
    # 30 steps: round(sqrt(30)) = 5 segments, the last one plain; forward checkpoints each LSTM layer's
    # steps, forward_loss whole-model time segments
    assert nodes == {"forward": 2 * 4, "forward_loss": 4}
    assert max(float(np.abs(a - b).max()) for a, b in zip(plain, ckpt)) <= 1e-12
    apply_activation_checkpointing(model, "none")
    assert model.checkpoint_segments is None and model.lstm.checkpoint_segments is None
    grads()
    assert nodes == {"forward": 0, "forward_loss": 0}


def test_apply_to_sequential_and_to_a_model_holding_one(checkpoint_nodes):
    dt.manual_seed(0)
    chain = nn.Sequential(*[m for _ in range(9) for m in (nn.Linear(6, 6, dtype="float64"), nn.ReLU())])
    x = dt.randn(4, 6, dtype="float64")
    chain(x).sum().backward()
    plain = [p.grad.numpy().copy() for p in chain.parameters()]
    apply_activation_checkpointing(chain, 3)
    chain.zero_grad()
    out = chain(x)
    assert checkpoint_nodes(out) == 2
    out.sum().backward()
    assert max(float(np.abs(p.grad.numpy() - g).max()) for p, g in zip(chain.parameters(), plain)) <= 1e-12
    chain.eval()
    assert checkpoint_nodes(chain(x)) == 0  # evaluation runs plainly
    chain.train()
    apply_activation_checkpointing(chain, "none")
    assert checkpoint_nodes(chain(x)) == 0

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = chain
            self.head = nn.Linear(6, 2, dtype="float64")

        def forward(self, v):
            return self.head(self.body(v))

    net = apply_activation_checkpointing(Net(), "sqrt")
    assert checkpoint_nodes(net(x)) == 3  # 18 modules: round(sqrt(18)) = 4 segments, the last plain
    with pytest.raises(ValueError, match="no nn.LSTM, no checkpoint_segments setting and no nn.Sequential"):
        apply_activation_checkpointing(nn.Linear(2, 2), "sqrt")
    with pytest.raises(ValueError, match="segments"):
        apply_activation_checkpointing(chain, "half")
