"""The fused LSTM layer with some inputs frozen (requires_grad False): every input that requires grad gets the
reference layer's gradient, the frozen ones none (from mutation testing: every test had all inputs trainable,
so a bias gradient computed only when the input-side bias trains went unnoticed)."""
import numpy as np
import pytest

import disttrain as dt
from disttrain.autograd.ops import lstm_layer, lstm_layer_reference

T, B, C, H = 4, 3, 2, 3
SHAPES = ((T, B, C), (B, H), (B, H), (4 * H, C), (4 * H, H), (4 * H,), (4 * H,))
NAMES = ("x", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh")


@pytest.mark.parametrize("frozen", [("b_ih",), ("b_hh",), ("b_ih", "b_hh"), ("x", "h0", "c0", "w_ih")])
def test_gradients_of_the_trainable_inputs_only(frozen):
    rng = np.random.default_rng(3)
    arrays = [rng.standard_normal(shape) for shape in SHAPES]
    probe = rng.standard_normal((T, B, H))
    results = []
    for layer in (lstm_layer, lstm_layer_reference):
        inputs = [dt.tensor(a, requires_grad=name not in frozen) for name, a in zip(NAMES, arrays)]
        out, _, _ = layer(*inputs)
        (out * dt.tensor(probe)).sum().backward()
        results.append({name: None if t.grad is None else t.grad.numpy() for name, t in zip(NAMES, inputs)})
    fused, reference = results
    for name in NAMES:
        if name in frozen:
            assert fused[name] is None, name
        else:
            np.testing.assert_allclose(fused[name], reference[name], rtol=1e-12, atol=1e-14, err_msg=name)
