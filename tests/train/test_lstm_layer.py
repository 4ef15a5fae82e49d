"""nn.LSTM and the fused LSTM cell and layer: torch equivalence, the composed references, gradcheck, dropout modes."""
import numpy as np
import pytest

import disttrain as dt
from disttrain import nn
from disttrain.autograd import grad, gradcheck
from disttrain.autograd.ops import lstm_cell, lstm_cell_reference, lstm_layer, lstm_layer_reference


def _randn(rng, *shape, requires_grad=True):
    return dt.tensor(rng.standard_normal(shape), dtype="float64", requires_grad=requires_grad)


@pytest.mark.torch
@pytest.mark.parametrize("layers", [1, 3])
@pytest.mark.parametrize("with_state", [False, True])
def test_lstm_matches_torch_outputs_and_gradients(layers, with_state):
    torch = pytest.importorskip("torch")
    T, B, C, H = 5, 3, 4, 6
    dt.manual_seed(0)
    ours = nn.LSTM(C, H, layers).double()
    theirs = torch.nn.LSTM(C, H, layers).double()
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            p.copy_(torch.from_numpy(ours.state_dict()[name].numpy()))
    rng = np.random.default_rng(1)
    x = rng.standard_normal((T, B, C))
    h0, c0 = rng.standard_normal((2, layers, B, H))
    probe = rng.standard_normal((T, B, H))         # the loss <probe, out> + sum(h_n) + 2 sum(c_n)

    xd = dt.tensor(x, dtype="float64", requires_grad=True)
    state = (dt.tensor(h0, dtype="float64", requires_grad=True),
             dt.tensor(c0, dtype="float64", requires_grad=True)) if with_state else None
    out, (h_n, c_n) = ours(xd, state)
    ((out * dt.tensor(probe)).sum() + h_n.sum() + 2 * c_n.sum()).backward()

    xt = torch.tensor(x, requires_grad=True)
    state_t = (torch.tensor(h0, requires_grad=True), torch.tensor(c0, requires_grad=True)) if with_state else None
    out_t, (h_t, c_t) = theirs(xt, state_t)
    ((out_t * torch.from_numpy(probe)).sum() + h_t.sum() + 2 * c_t.sum()).backward()

    tol = dict(rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(out.numpy(), out_t.detach().numpy(), **tol)
    np.testing.assert_allclose(h_n.numpy(), h_t.detach().numpy(), **tol)
    np.testing.assert_allclose(c_n.numpy(), c_t.detach().numpy(), **tol)
    np.testing.assert_allclose(xd.grad.numpy(), xt.grad.numpy(), **tol)
    if with_state:
        np.testing.assert_allclose(state[0].grad.numpy(), state_t[0].grad.numpy(), **tol)
        np.testing.assert_allclose(state[1].grad.numpy(), state_t[1].grad.numpy(), **tol)
    named = dict(ours.named_parameters())
    assert list(named) == [n for n, _ in theirs.named_parameters()]
    for name, p in theirs.named_parameters():
        np.testing.assert_allclose(named[name].grad.numpy(), p.grad.numpy(), err_msg=name, **tol)


def test_fused_cell_equals_reference_in_values_and_gradients():
    rng = np.random.default_rng(2)
    B, H = 4, 5
    inputs = [_randn(rng, B, 4 * H), _randn(rng, B, H), _randn(rng, B, H), _randn(rng, 4 * H, H)]
    dh, dc = rng.standard_normal((2, B, H))
    results = []
    for cell in (lstm_cell, lstm_cell_reference):
        for t in inputs:
            t.grad = None
        h, c = cell(*inputs)
        ((h * dt.tensor(dh)).sum() + (c * dt.tensor(dc)).sum()).backward()
        results.append([h.numpy(), c.numpy()] + [t.grad.numpy() for t in inputs])
    for fused, reference in zip(*results):
        np.testing.assert_allclose(fused, reference, rtol=1e-12, atol=1e-14)


def test_fused_cell_gradcheck():
    rng = np.random.default_rng(3)
    inputs = [_randn(rng, 2, 12), _randn(rng, 2, 3), _randn(rng, 2, 3), _randn(rng, 12, 3)]
    assert gradcheck(lambda *xs: lstm_cell(*xs), inputs)


def _layer_inputs(rng, steps=4, batch=3, features=2, hidden=3):
    shapes = [(steps, batch, features), (batch, hidden), (batch, hidden), (4 * hidden, features),
              (4 * hidden, hidden), (4 * hidden,), (4 * hidden,)]
    return [_randn(rng, *shape) for shape in shapes]


def test_fused_layer_equals_reference_in_values_and_gradients():
    rng = np.random.default_rng(6)
    inputs = _layer_inputs(rng)
    probes = [dt.tensor(rng.standard_normal(shape)) for shape in ((4, 3, 3), (3, 3), (3, 3))]
    results = []
    for layer in (lstm_layer, lstm_layer_reference):
        for t in inputs:
            t.grad = None
        outputs = layer(*inputs)
        sum((o * p).sum() for o, p in zip(outputs, probes)).backward()
        results.append([o.numpy() for o in outputs] + [t.grad.numpy() for t in inputs])
    for fused, reference in zip(*results):
        np.testing.assert_allclose(fused, reference, rtol=1e-12, atol=1e-14)


def test_fused_layer_gradcheck():
    assert gradcheck(lambda *xs: list(lstm_layer(*xs)), _layer_inputs(np.random.default_rng(7), steps=3, batch=2))


def test_fused_layer_second_derivatives_equal_the_reference():
    """create_graph: the layer's backward differentiates the composed cells, so grad of grad works."""
    rng = np.random.default_rng(8)
    inputs = _layer_inputs(rng, steps=3, batch=2)
    results = []
    for layer in (lstm_layer, lstm_layer_reference):
        out, h, c = layer(*inputs)
        first = grad((out * out).sum() + (h * c).sum(), inputs, create_graph=True)
        results.append(grad(sum((g * g).sum() for g in first), inputs))
    for fused, reference in zip(*results):
        np.testing.assert_allclose(fused.numpy(), reference.numpy(), rtol=1e-10, atol=1e-12)


def test_fused_layer_refuses_backward_after_its_output_changed_in_place():
    inputs = _layer_inputs(np.random.default_rng(9))
    out, _, _ = lstm_layer(*inputs)
    loss = out.sum()
    with dt.no_grad():
        out.add_(1.0)
    with pytest.raises(RuntimeError, match="modified in place"):
        loss.backward()


def test_lstm_gradcheck_inputs_state_and_weights():
    dt.manual_seed(4)
    lstm = nn.LSTM(2, 3, num_layers=2).double()
    rng = np.random.default_rng(4)
    x, h0, c0 = _randn(rng, 3, 2, 2), _randn(rng, 2, 2, 3), _randn(rng, 2, 2, 3)
    params = list(lstm.parameters())

    def run(x, h0, c0, *weights):        # the weights are perturbed in place; the module reads them
        out, (h, c) = lstm(x, (h0, c0))
        return [out, h, c]

    assert gradcheck(run, [x, h0, c0, *params])


def test_dropout_between_layers_only_in_train_mode():
    dt.manual_seed(5)
    dropped = nn.LSTM(4, 8, num_layers=2, dropout=0.5)
    plain = nn.LSTM(4, 8, num_layers=2)
    plain.load_state_dict(dropped.state_dict())
    x = dt.tensor(np.random.default_rng(5).standard_normal((6, 3, 4)), dtype="float32")

    dropped.eval()
    eval_out, (eval_h, _) = dropped(x)
    np.testing.assert_array_equal(eval_out.numpy(), plain(x)[0].numpy())     # eval: no dropout at all
    np.testing.assert_array_equal(dropped(x)[0].numpy(), eval_out.numpy())

    dropped.train()
    first, (h1, _) = dropped(x)
    second, _ = dropped(x)
    assert not np.array_equal(first.numpy(), eval_out.numpy())            # train: masks between the layers
    assert not np.array_equal(first.numpy(), second.numpy())              # a fresh mask per call
    np.testing.assert_array_equal(h1.numpy()[0], eval_h.numpy()[0])       # layer 0 itself is untouched
    assert np.all(first.numpy() != 0)                                     # the last layer's output is not dropped

    single = nn.LSTM(4, 8, num_layers=1, dropout=0.5)
    single.train()
    np.testing.assert_array_equal(single(x)[0].numpy(), single.eval()(x)[0].numpy())  # nothing between layers
