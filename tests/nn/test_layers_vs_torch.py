"""Each layer against torch.nn with the same weights (float64): outputs and all gradients."""
import numpy as np
import pytest

import disttrain as dt
from disttrain import nn

torch = pytest.importorskip("torch")

TOL = dict(rtol=1e-10, atol=1e-12)


def load_into_torch(module, torch_module):
    """Copy our state_dict into the torch module: the keys and shapes must map 1:1."""
    sd = {k: torch.from_numpy(v.numpy().copy()) for k, v in module.state_dict().items()}
    torch_module.double().load_state_dict(sd, strict=True)
    return torch_module


def compare(module, torch_module, x, x_is_index=False):
    """Same output, and the same gradients for the input and every parameter."""
    module.double()
    torch_module = load_into_torch(module, torch_module)
    rng = np.random.default_rng(0)
    if x_is_index:
        xd, xt = dt.tensor(x), torch.from_numpy(x)
    else:
        xd = dt.tensor(x, dtype="float64", requires_grad=True)
        xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    out, out_t = module(xd), torch_module(xt)
    np.testing.assert_allclose(out.numpy(), out_t.detach().numpy(), **TOL)
    upstream = rng.standard_normal(out.shape)
    (out * dt.tensor(upstream, dtype="float64")).sum().backward()
    (out_t * torch.from_numpy(upstream)).sum().backward()
    if not x_is_index:
        np.testing.assert_allclose(xd.grad.numpy(), xt.grad.numpy(), **TOL)
    torch_params = dict(torch_module.named_parameters())
    for name, p in module.named_parameters():
        np.testing.assert_allclose(p.grad.numpy(), torch_params[name].grad.numpy(), err_msg=name, **TOL)


def randn(*shape):
    return np.random.default_rng(1).standard_normal(shape)


def test_linear_with_leading_dims():
    compare(nn.Linear(5, 3), torch.nn.Linear(5, 3), randn(2, 4, 5))


def test_linear_2d_no_bias():
    m = nn.Linear(4, 6, bias=False)
    assert m.bias is None and [n for n, _ in m.named_parameters()] == ["weight"]
    compare(m, torch.nn.Linear(4, 6, bias=False), randn(3, 4))


def test_embedding():
    idx = np.array([[0, 3, 3], [9, 1, 0]], dtype=np.int64)
    compare(nn.Embedding(10, 4), torch.nn.Embedding(10, 4), idx, x_is_index=True)


@pytest.mark.parametrize("kernel, stride, padding", [(3, 1, 0), (3, 2, 1), ((2, 3), (1, 2), (1, 0))])
def test_conv2d(kernel, stride, padding):
    compare(nn.Conv2d(3, 4, kernel, stride=stride, padding=padding),
            torch.nn.Conv2d(3, 4, kernel, stride=stride, padding=padding), randn(2, 3, 7, 6))


def test_conv2d_no_bias():
    compare(nn.Conv2d(2, 3, 2, bias=False), torch.nn.Conv2d(2, 3, 2, bias=False), randn(1, 2, 5, 5))


@pytest.mark.parametrize("kernel, stride, padding", [(2, None, 0), (3, 2, 1), (3, 1, 0)])
def test_max_pool2d(kernel, stride, padding):
    compare(nn.MaxPool2d(kernel, stride, padding), torch.nn.MaxPool2d(kernel, stride, padding), randn(2, 3, 7, 6))


@pytest.mark.parametrize("kernel, stride, padding", [(2, None, 0), (3, 2, 1)])
def test_avg_pool2d(kernel, stride, padding):
    compare(nn.AvgPool2d(kernel, stride, padding), torch.nn.AvgPool2d(kernel, stride, padding), randn(2, 3, 7, 6))


@pytest.mark.parametrize("shape", [6, (4, 6)])
def test_layer_norm(shape):
    m = nn.LayerNorm(shape, eps=1e-3)
    with dt.no_grad():  # non-trivial affine parameters
        m.weight.copy_(randn(*m.weight.shape).astype(np.float32))
        m.bias.copy_(randn(*m.bias.shape).astype(np.float32) * 0.5)
    compare(m, torch.nn.LayerNorm(shape, eps=1e-3), randn(3, 4, 6))


@pytest.mark.parametrize("ours, theirs", [(nn.ReLU, torch.nn.ReLU), (nn.Tanh, torch.nn.Tanh),
                                          (nn.Sigmoid, torch.nn.Sigmoid), (nn.Flatten, torch.nn.Flatten),
                                          (nn.Identity, torch.nn.Identity)])
def test_stateless_layers(ours, theirs):
    compare(ours(), theirs(), randn(2, 3, 4, 5) * 3)


def test_gelu_tanh_form():
    compare(nn.GELU(approximate="tanh"), torch.nn.GELU(approximate="tanh"), randn(2, 3, 4) * 3)


def test_gelu_default_is_the_exact_form():
    compare(nn.GELU(), torch.nn.GELU(), randn(2, 3, 4) * 3)


def test_flatten_ranges():
    x = randn(2, 3, 4, 5)
    for start, end in [(0, -1), (1, 2), (2, 3)]:
        compare(nn.Flatten(start, end), torch.nn.Flatten(start, end), x)


def test_dropout_in_eval_mode_is_identity_like_torch():
    compare(nn.Dropout(0.5).eval(), torch.nn.Dropout(0.5).eval(), randn(4, 5))


def test_cnn_state_dict_keys_match_torch_and_outputs_agree():
    ours = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.LayerNorm(64), nn.Linear(64, 3))
    theirs = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                                 torch.nn.Flatten(), torch.nn.LayerNorm(64), torch.nn.Linear(64, 3))
    assert list(ours.state_dict()) == list(theirs.state_dict())
    compare(ours, theirs, randn(2, 1, 8, 8))


def test_nested_module_state_dict_keys_match_torch():
    class Ours(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(5, 3)
            self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(3, 3), nn.Tanh()) for _ in range(2)])
            self.norm = nn.LayerNorm(3)

    class Theirs(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(5, 3)
            self.blocks = torch.nn.ModuleList([torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Tanh())
                                               for _ in range(2)])
            self.norm = torch.nn.LayerNorm(3)

    assert list(Ours().state_dict()) == list(Theirs().state_dict())
    assert [n for n, _ in Ours().named_parameters()] == [n for n, _ in Theirs().named_parameters()]


def test_cross_entropy_and_mse_loss_modules():
    logits = randn(6, 4)
    target = np.array([0, 3, 1, 1, 2, 0])
    x = dt.tensor(logits, requires_grad=True)
    xt = torch.tensor(logits, requires_grad=True)
    loss = nn.CrossEntropyLoss()(x, dt.tensor(target))
    loss_t = torch.nn.CrossEntropyLoss()(xt, torch.from_numpy(target))
    loss.backward()
    loss_t.backward()
    np.testing.assert_allclose(loss.item(), loss_t.item(), **TOL)
    np.testing.assert_allclose(x.grad.numpy(), xt.grad.numpy(), **TOL)
    y = randn(6, 4) * 0 + 1
    np.testing.assert_allclose(nn.MSELoss()(dt.tensor(logits), dt.tensor(y)).item(),
                               torch.nn.MSELoss()(torch.from_numpy(logits), torch.from_numpy(y)).item(), **TOL)
