"""CUDA-graph capture of a training step: replays compute what the eager steps compute."""
import numpy as np
import pytest

import disttrain as dt
from disttrain import optim
from disttrain.models import LSTMLanguageModel
from disttrain.nn import functional as F
from disttrain.nn.utils import clip_grad_norm_

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not dt.cuda_available(), reason="needs a CUDA GPU")]

VOCAB, BATCH, BPTT = 50, 4, 6


def _model():
    dt.manual_seed(0)
    return LSTMLanguageModel(VOCAB, hidden=16, layers=2).double().to("cuda")


def _segments(n):
    return np.random.default_rng(0).integers(0, VOCAB, (n, BPTT + 1, BATCH))


def test_replayed_steps_equal_eager_steps():
    from disttrain.train.cuda_graph import capture_lm_step

    segments = _segments(5)
    eager = _model()
    params = list(eager.parameters())
    opt = optim.SGD(params, lr=0.5)
    state, eager_losses = None, []
    for seg in segments:
        logits, (h, c) = eager(dt.tensor(seg[:-1], device="cuda"), state)
        loss = F.cross_entropy(logits, dt.tensor(seg[1:].reshape(-1), device="cuda"))
        opt.zero_grad()
        loss.backward()
        clip_grad_norm_(params, 0.1)
        opt.step()
        state = (h.detach(), c.detach())
        eager_losses.append(loss.item())

    model = _model()
    step = capture_lm_step(model, optim.SGD(list(model.parameters()), lr=0.5), BATCH, BPTT, clip_norm=0.1)
    graph_losses = [float(step(seg[:-1], seg[1:])[0]) for seg in segments]
    np.testing.assert_allclose(graph_losses, eager_losses, rtol=1e-10)
    for a, b in zip(model.parameters(), params):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(step.state[0].get(), state[0].numpy(), rtol=1e-9, atol=1e-12)


def test_capture_refuses_what_a_graph_would_get_wrong():
    from disttrain.train.cuda_graph import capture_lm_step

    model = _model()
    with pytest.raises(ValueError, match="SGD only"):
        capture_lm_step(model, optim.Adam(list(model.parameters())), BATCH, BPTT)
    dt.manual_seed(0)
    dropped = LSTMLanguageModel(VOCAB, hidden=16, layers=2, dropout=0.5).to("cuda")
    with pytest.raises(ValueError, match="dropout"):
        capture_lm_step(dropped, optim.SGD(list(dropped.parameters()), lr=0.1), BATCH, BPTT)
    step = capture_lm_step(model, optim.SGD(list(model.parameters()), lr=0.1), BATCH, BPTT)
    bad = np.full((BPTT, BATCH), VOCAB)
    with pytest.raises(ValueError, match="out of range"):
        step(bad, bad)
    with pytest.raises(ValueError, match="does not match"):
        step.step(np.zeros((BPTT + 1, BATCH), np.int64), np.zeros((BPTT + 1, BATCH), np.int64))
