"""LSTMLanguageModel.forward_loss: whole-model time-segment checkpointing against the plain step."""
import numpy as np
import pytest

import disttrain as dt
from disttrain.models.lstm_lm import LSTMLanguageModel
from disttrain.nn import functional as F

VOCAB = 20


def window(steps, batch=3, seed=0):
    rng = np.random.default_rng(seed)
    return (dt.tensor(rng.integers(0, VOCAB, (steps, batch))), dt.tensor(rng.integers(0, VOCAB, (steps, batch))))


def make_model(dtype="float64", dropout=0.0, **kwargs):
    dt.manual_seed(0)
    model = LSTMLanguageModel(VOCAB, hidden=6, layers=2, embed=5, dropout=dropout, **kwargs)
    return model.double() if dtype == "float64" else model


def initial_state(model, batch, dtype="float64"):
    shape = (model.lstm.num_layers, batch, model.lstm.hidden_size)
    return dt.randn(*shape, dtype=dtype, requires_grad=True), dt.randn(*shape, dtype=dtype, requires_grad=True)


def step(model, loss_fn, state=None, seed=5):
    """loss_fn(state) -> (loss, (h, c)); backward of loss + a term on the final state -> numbers to compare."""
    model.zero_grad()
    for s in state or ():
        s.grad = None
    dt.manual_seed(seed)
    loss, (h, c) = loss_fn(state)
    (loss + (h * c).sum()).backward()
    grads = [p.grad.numpy().copy() for p in model.parameters()] + [s.grad.numpy().copy() for s in state or ()]
    return [loss.numpy().copy(), h.numpy().copy(), c.numpy().copy()], grads


def plain_loss(model, tokens, targets):
    def run(state):
        logits, state = model(tokens, state)
        return F.cross_entropy(logits, targets.reshape((-1,))), state
    return run


def largest_difference(a, b):
    return max(float(np.abs(x - y).max()) for x, y in zip(a, b))


def test_unchecked_forward_loss_is_forward_plus_cross_entropy_bit_for_bit():
    model = make_model("float32", dropout=0.3)
    tokens, targets = window(11)
    values, grads = step(model, lambda s: model.forward_loss(tokens, targets, s))
    plain_values, plain_grads = step(model, plain_loss(model, tokens, targets))
    for a, b in zip(values + grads, plain_values + plain_grads):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("segments", ["sqrt", 1, 4, 10, 37, 50])
@pytest.mark.parametrize("with_state", [False, True])
def test_float64_gradients_equal_the_plain_step(segments, with_state):
    model = make_model()
    tokens, targets = window(37)
    state = initial_state(model, 3) if with_state else None
    plain_values, plain_grads = step(model, plain_loss(model, tokens, targets), state)
    model.checkpoint_segments = segments
    values, grads = step(model, lambda s: model.forward_loss(tokens, targets, s), state)
    assert largest_difference(plain_grads, grads) <= 1e-12
    assert largest_difference(plain_values, values) <= 1e-13


def test_tied_weights_get_the_gradients_of_both_uses():
    dt.manual_seed(0)
    model = LSTMLanguageModel(VOCAB, hidden=6, layers=1, dropout=0.0, tie_weights=True).double()
    tokens, targets = window(17)
    _, plain = step(model, plain_loss(model, tokens, targets))
    model.checkpoint_segments = "sqrt"
    _, grads = step(model, lambda s: model.forward_loss(tokens, targets, s))
    assert largest_difference(plain, grads) <= 1e-12


@pytest.mark.parametrize("dtype, tolerance", [("float64", None), ("float32", 1e-5)])
def test_dropout_masks_replay_in_the_recomputation(dtype, tolerance):
    """Segments draw their masks in time order; checkpointing them must reproduce the uncheckpointed schedule."""
    model = make_model(dtype, dropout=0.4, checkpoint_segments="sqrt")
    tokens, targets = window(30)
    state = initial_state(model, 3, dtype)
    kept_values, kept_grads = step(model, lambda s: model._segmented_loss(tokens, targets, s, "sqrt", False), state)
    values, grads = step(model, lambda s: model.forward_loss(tokens, targets, s), state)
    if tolerance is None:
        assert largest_difference(kept_grads, grads) <= 1e-12
        assert largest_difference(kept_values, values) == 0
    else:
        for a, b in zip(kept_values + kept_grads, values + grads):
            np.testing.assert_allclose(b, a, rtol=tolerance, atol=tolerance)


def test_float32_allclose_and_each_parameter_hook_fires_once():
    model = make_model("float32", tie_weights=False)
    tokens, targets = window(40, batch=4)
    _, plain = step(model, plain_loss(model, tokens, targets))
    fired = {}
    for p in model.parameters():
        p.register_post_accumulate_grad_hook(lambda t: fired.__setitem__(id(t), fired.get(id(t), 0) + 1))
    model.checkpoint_segments = "sqrt"
    _, grads = step(model, lambda s: model.forward_loss(tokens, targets, s))
    assert sorted(fired.values()) == [1] * len(list(model.parameters()))  # one final gradient each (DDP hooks)
    for a, b in zip(plain, grads):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


def test_each_segment_runs_once_forward_and_once_more_in_backward_except_the_last(checkpoint_nodes):
    model = make_model(checkpoint_segments="sqrt")  # T = 30: 5 segments, 4 of them checkpointed
    tokens, targets = window(30)
    runs = []
    real_forward = model.lstm.forward
    model.lstm.forward = lambda x, hx=None: runs.append(x.shape[0]) or real_forward(x, hx)
    loss, _ = model.forward_loss(tokens, targets)
    assert checkpoint_nodes(loss) == 4 and runs == [6] * 5
    assert model.lstm.checkpoint_segments == "sqrt"  # restored after each segment ran with it off
    loss.backward()
    assert runs == [6] * 9  # the 4 checkpointed segments once more, never the LSTM's own segments inside
    for p in model.parameters():
        assert p.grad is not None


def test_short_windows_and_no_grad(checkpoint_nodes):
    model = make_model(checkpoint_segments=8)
    tokens, targets = window(5)
    loss, _ = model.forward_loss(tokens, targets)  # T = 5 < 8 segments: 5 segments of one step
    assert checkpoint_nodes(loss) == 4
    one, _ = model.forward_loss(*window(1))
    assert checkpoint_nodes(one) == 0
    plain, _ = plain_loss(model, tokens, targets)(None)
    model.eval()
    with dt.no_grad():  # evaluation: nothing kept for backward, nothing to checkpoint
        evaluated, _ = model.forward_loss(tokens, targets)
    assert evaluated.grad_fn is None and evaluated.item() == plain.item()


def test_bad_shapes_and_settings_are_refused():
    model = make_model()
    tokens, targets = window(6)
    with pytest.raises(ValueError, match=r"tokens and targets of the same shape \(T, B\)"):
        model.forward_loss(tokens, targets.reshape((-1,)))
    with pytest.raises(ValueError, match="segments"):
        model.checkpoint_segments = 0
    assert "checkpoint_segments='sqrt'" in repr(make_model(checkpoint_segments="sqrt"))
