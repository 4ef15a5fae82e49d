"""The hot paths of a training step go through `backend.kernels`, so the CUDA backend's fused kernels
are what runs on a GPU. Checked on the CPU with a spy around kernels_numpy; the CUDA backend's
scatter-add routing is checked with the wrappers' launches recorded instead of run."""
import types

import numpy as np
import pytest

import disttrain as dt
from disttrain import nn, optim
from disttrain.kernels_cuda import wrappers
from disttrain.models import LSTMLanguageModel, TransformerLanguageModel
from disttrain.nn import functional as F
from disttrain.nn.utils import clip_grad_norm_
from disttrain.tensor import backend as backend_module
from disttrain.tensor import kernels_numpy


@pytest.fixture
def calls(monkeypatch):
    """Replace the CPU backend's kernels by a spy module that records each call, then runs the reference."""
    seen = []
    spy = types.ModuleType("kernels_spy")
    for name, f in vars(kernels_numpy).items():
        if callable(f) and not name.startswith("_"):
            def wrapped(*args, _f=f, _name=name, **kwargs):
                seen.append(_name)
                return _f(*args, **kwargs)
            setattr(spy, name, wrapped)
    monkeypatch.setattr(backend_module.CPU, "kernels", spy)
    return seen


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_a_language_model_step_uses_the_fused_kernels(calls, kind):
    dt.manual_seed(0)
    model = LSTMLanguageModel(vocab_size=11, hidden=6, layers=2, embed=5)
    params = list(model.parameters())
    opt = optim.SGD(params, lr=0.5, momentum=0.9) if kind == "sgd" else optim.Adam(params, lr=1e-3)
    tokens = dt.tensor(np.arange(12).reshape(4, 3) % 11)
    logits, _ = model(tokens)
    loss = F.cross_entropy(logits, dt.tensor(np.arange(12) % 11))
    loss.backward()
    clip_grad_norm_(params, 1e-3)  # small: the gradients are scaled
    opt.step()
    layers = 2  # one fused layer kernel per layer, forward and backward
    assert calls.count("lstm_layer_forward") == layers and calls.count("lstm_layer_backward") == layers
    assert calls.count("cross_entropy_forward") == 1 and calls.count("cross_entropy_backward") == 1
    assert calls.count("norms") == 1 and calls.count("scale_") == 1  # each one call for all the gradients
    assert calls.count(f"foreach_{kind}_step") == 1                     # one call for all the parameters


def test_a_transformer_step_uses_the_fused_kernels(calls):
    dt.manual_seed(0)
    model = TransformerLanguageModel(11, d_model=8, heads=2, layers=2, d_ff=16, max_len=6)
    tokens = dt.tensor(np.arange(12).reshape(6, 2) % 11)
    model.forward_loss(tokens, tokens)[0].backward()
    layers = 2  # per block: a GELU and an attention; two LayerNorms, and the final one
    for name in ("gelu_forward", "gelu_backward", "attention_forward", "attention_backward"):
        assert calls.count(name) == layers, name
    assert calls.count("layer_norm_forward") == calls.count("layer_norm_backward") == 2 * layers + 1


def test_sigmoid_op_uses_the_kernel(calls):
    dt.sigmoid(dt.tensor([0.5, -2.0], requires_grad=True))
    assert calls == ["sigmoid"]


def test_cuda_backend_sends_row_scatter_add_to_the_atomic_kernel(monkeypatch):
    """CudaBackend.index_add with NumPy standing in for CuPy: the wrapper's launch is recorded."""
    pytest.importorskip("cupyx", reason="CuPy (the cuda extra) is not installed")
    launched = []

    def fake_kernel(source, name, dtype=None):
        return lambda grid, block, args, shared_mem=0: launched.append((source, name, np.dtype(dtype)))

    monkeypatch.setattr(wrappers, "kernel", fake_kernel)
    backend = backend_module.CudaBackend(np)
    backend.index_add(np.zeros((5, 3), np.float32), np.array([[1, 2], [2, 4]]), np.ones((2, 2, 3), np.float32))
    assert launched == [("embedding", "index_add_rows", np.dtype(np.float32))]


def test_sync_checks_gate_the_host_side_index_checks(monkeypatch):
    weight = nn.Embedding(4, 2).weight
    with pytest.raises(IndexError, match="out of range"):
        F.embedding(dt.tensor(np.array([4])), weight)
    logits = dt.zeros(2, 3, requires_grad=True)
    with pytest.raises(ValueError, match="out of range"):
        F.cross_entropy(logits, dt.tensor(np.array([0, 3])))
    monkeypatch.setattr(backend_module.CPU, "sync_checks", False)  # as while capturing a CUDA graph
    with pytest.raises(ValueError) as info:  # NumPy's own error through GetItem now, not the op's check
        F.embedding(dt.tensor(np.array([4])), weight)
    assert "GetItem" in str(info.value) and "embedding: index out of range" not in str(info.value)
