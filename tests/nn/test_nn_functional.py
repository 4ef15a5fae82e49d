import numpy as np
import pytest

import disttrain as dt
from disttrain.nn import functional as F


def x_():
    return dt.tensor(np.random.default_rng(0).standard_normal((3, 4, 5)))


def test_softmax_accepts_dim_and_axis():
    x = x_()
    np.testing.assert_array_equal(F.softmax(x, dim=1).numpy(), F.softmax(x, axis=1).numpy())
    np.testing.assert_allclose(F.softmax(x, dim=1).numpy().sum(axis=1), 1.0, rtol=1e-12)
    np.testing.assert_array_equal(F.softmax(x).numpy(), F.softmax(x, -1).numpy())
    np.testing.assert_allclose(np.exp(F.log_softmax(x, dim=0).numpy()), F.softmax(x, axis=0).numpy(), rtol=1e-12)
    with pytest.raises(ValueError, match="pass one"):
        F.softmax(x, dim=0, axis=1)


def test_dropout_training_flag_and_scaling():
    x = dt.ones(200, 100)
    assert F.dropout(x, 0.3, training=False) is x
    y = F.dropout(x, 0.3).numpy()
    np.testing.assert_allclose(np.unique(y), [0.0, 1 / 0.7], rtol=1e-6)
    np.testing.assert_allclose((y == 0).mean(), 0.3, atol=0.01)


def test_dropout_module_respects_train_and_eval():
    drop = dt.nn.Dropout(0.5)
    x = dt.ones(50, 40)
    assert (drop(x).numpy() == 0).any()
    drop.eval()
    assert drop(x) is x
    drop.train()
    dt.manual_seed(5)
    a = drop(x).numpy()
    dt.manual_seed(5)
    np.testing.assert_array_equal(a, drop(x).numpy())
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        dt.nn.Dropout(1.0)


def test_linear_matches_numpy_for_1d_2d_3d_inputs():
    rng = np.random.default_rng(1)
    w, b = rng.standard_normal((3, 5)), rng.standard_normal(3)
    for shape in [(5,), (4, 5), (2, 4, 5)]:
        x = rng.standard_normal(shape)
        out = F.linear(dt.tensor(x), dt.tensor(w), dt.tensor(b))
        np.testing.assert_allclose(out.numpy(), x @ w.T + b, rtol=1e-12)
    with pytest.raises(ValueError, match="in_features=5"):
        F.linear(dt.tensor(rng.standard_normal((2, 4))), dt.tensor(w))


def test_embedding_and_losses_reexported():
    w = dt.tensor(np.arange(12.0).reshape(4, 3))
    np.testing.assert_array_equal(F.embedding(dt.tensor([[3, 0]]), w).numpy(), [[[9, 10, 11], [0, 1, 2]]])
    assert F.mse_loss(dt.ones(3), dt.zeros(3)).item() == 1.0
    logits = dt.zeros(2, 4)
    np.testing.assert_allclose(F.cross_entropy(logits, dt.tensor([1, 2])).item(), np.log(4), rtol=1e-6)


def test_functional_names_available_from_package():
    for name in ["relu", "sigmoid", "tanh", "softmax", "log_softmax", "cross_entropy", "mse_loss", "dropout",
                 "embedding", "layer_norm", "conv2d", "max_pool2d", "avg_pool2d", "linear"]:
        assert callable(getattr(dt.nn.functional, name))
