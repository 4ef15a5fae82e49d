import math

import numpy as np
import pytest

import disttrain as dt
from disttrain import nn
from disttrain.nn import init


@pytest.fixture(autouse=True)
def seeded():
    dt.manual_seed(0)


def big(*shape):
    return nn.Parameter(dt.zeros(*shape))


def assert_uniform(t, bound):
    """Within the bounds, reaching near both ends, std bound/sqrt(3) to 4 standard errors."""
    values = t.numpy()
    assert values.min() >= -bound and values.max() <= bound
    assert values.min() < -0.95 * bound and values.max() > 0.95 * bound
    np.testing.assert_allclose(values.std(), bound / math.sqrt(3), rtol=4 * math.sqrt(0.2 / values.size))


def assert_normal(t, std, mean=0.0):
    """Mean and std to 4 standard errors."""
    values = t.numpy()
    np.testing.assert_allclose(values.mean(), mean, atol=4 * std / math.sqrt(values.size))
    np.testing.assert_allclose(values.std(), std, rtol=4 / math.sqrt(2 * values.size))


def test_fan_in_and_fan_out_use_pytorch_layouts():
    assert init.calculate_fan_in_and_fan_out(big(7, 3)) == (3, 7)
    assert init.calculate_fan_in_and_fan_out(big(8, 4, 3, 2)) == (24, 48)
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        init.calculate_fan_in_and_fan_out(big(5))


def test_gains_match_torch():
    torch = pytest.importorskip("torch")
    for name, param in [("linear", None), ("sigmoid", None), ("tanh", None), ("relu", None),
                        ("leaky_relu", None), ("leaky_relu", 0.2), ("selu", None), ("conv2d", None)]:
        assert init.calculate_gain(name, param) == pytest.approx(torch.nn.init.calculate_gain(name, param))


def test_uniform_normal_constant():
    assert_uniform(init.uniform_(big(200, 100), -0.5, 0.5), 0.5)
    assert_normal(init.normal_(big(200, 100), 2.0, 0.5), 0.5, mean=2.0)
    assert np.all(init.constant_(big(3, 3), 0.25).numpy() == 0.25)
    assert np.all(init.ones_(big(3)).numpy() == 1) and np.all(init.zeros_(big(3)).numpy() == 0)


def test_xavier():
    gain = 2.0
    assert_uniform(init.xavier_uniform_(big(300, 100), gain), gain * math.sqrt(6 / 400))
    assert_normal(init.xavier_normal_(big(300, 100), gain), gain * math.sqrt(2 / 400))


def test_kaiming_modes_and_nonlinearities():
    assert_uniform(init.kaiming_uniform_(big(100, 50, 2, 2)), math.sqrt(2) * math.sqrt(3 / 200))  # a=0: gain sqrt(2)
    assert_uniform(init.kaiming_uniform_(big(100, 200), mode="fan_out", nonlinearity="relu"), math.sqrt(6 / 100))
    assert_normal(init.kaiming_normal_(big(200, 150), nonlinearity="relu"), math.sqrt(2 / 150))
    assert_normal(init.kaiming_normal_(big(200, 150), a=0.2, mode="fan_out"), math.sqrt(2 / 1.04 / 200))
    with pytest.raises(ValueError, match="fan_in"):
        init.kaiming_normal_(big(2, 2), mode="fan_mid")


def test_init_is_in_place_keeps_dtype_and_bumps_version():
    p = nn.Parameter(dt.zeros(30, 20, dtype="float64"))
    array, version = p.data, p._version
    init.normal_(p)
    assert p.data is array and p.dtype == dt.float64 and p._version > version
    assert p.requires_grad and dt.is_grad_enabled()


def test_default_layer_inits_match_pytorch_bounds():
    lin = nn.Linear(400, 300)
    assert_uniform(lin.weight, 1 / math.sqrt(400))
    assert_uniform(lin.bias, 1 / math.sqrt(400))
    conv = nn.Conv2d(16, 300, 5)
    assert_uniform(conv.weight, 1 / math.sqrt(16 * 25))
    assert_uniform(conv.bias, 1 / math.sqrt(16 * 25))
    assert_normal(nn.Embedding(300, 100).weight, 1.0)
    norm = nn.LayerNorm((2, 3))
    assert np.all(norm.weight.numpy() == 1) and np.all(norm.bias.numpy() == 0)


def test_manual_seed_makes_inits_reproducible():
    dt.manual_seed(123)
    a = nn.Sequential(nn.Linear(4, 5), nn.Embedding(6, 3))
    dt.manual_seed(123)
    b = nn.Sequential(nn.Linear(4, 5), nn.Embedding(6, 3))
    c = nn.Sequential(nn.Linear(4, 5), nn.Embedding(6, 3))
    for k in a.state_dict():
        np.testing.assert_array_equal(a.state_dict()[k].numpy(), b.state_dict()[k].numpy())
    assert not np.array_equal(a[0].weight.numpy(), c[0].weight.numpy())
