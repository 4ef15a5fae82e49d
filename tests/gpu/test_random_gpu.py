"""The GPU's random numbers (the counter_uniform kernel itself is checked bit for bit against its
reference in tests/kernels_cuda/test_kernels_against_reference.py): the
cuda generator's state is saved, restored and replayed (checkpointed dropout, job checkpoints).
The same logic on a stand-in backend runs on the CPU in tests/tensor/test_random.py."""
import json

import numpy as np
import pytest

import disttrain as dt
from disttrain.checkpointing import checkpoint
from disttrain.nn import functional as F
from disttrain.tensor import kernels_numpy as K
from disttrain.tensor import random
from disttrain.tensor.backend import get_backend

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not dt.cuda_available(), reason="needs a CUDA GPU")]


@pytest.fixture(autouse=True)
def _restore_rng_state():
    state = dt.get_rng_state()
    yield
    dt.set_rng_state(state)


def _cuda_draw(n=8):
    return random.generator(get_backend("cuda")).random((n,), dtype=np.float32).get()


def test_rng_state_round_trips_the_cuda_stream(cp):
    dt.manual_seed(21)
    _cuda_draw(5)
    state = json.loads(json.dumps(dt.get_rng_state()))  # as a job checkpoint stores it
    assert state["cuda"] == {"seed": 21, "offset": 5}
    expected = _cuda_draw()
    _cuda_draw(1000)
    dt.set_rng_state(state)
    np.testing.assert_array_equal(_cuda_draw(), expected)
    with random.fork_rng(state):
        np.testing.assert_array_equal(_cuda_draw(), expected)
    np.testing.assert_array_equal(_cuda_draw(), K.counter_uniform(np, (8,), np.float32, 21, 13))


def _segment(x, w):
    return F.dropout(dt.tanh(x @ w), p=0.5)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_checkpointed_dropout_on_cuda_gives_the_plain_gradients(cp, dtype):
    rng = np.random.default_rng(0)
    x = dt.tensor(rng.standard_normal((64, 32)), dtype=dtype, device="cuda", requires_grad=True)
    w = dt.tensor(rng.standard_normal((32, 48)), dtype=dtype, device="cuda", requires_grad=True)

    def grads(run):
        x.grad = w.grad = None
        dt.manual_seed(5)
        _cuda_draw(3)  # the segment does not start at the seed's first number
        out = F.dropout(run(x, w), p=0.3)
        (out * out).sum().backward()
        return x.grad.numpy(), w.grad.numpy(), _cuda_draw()

    plain = grads(_segment)
    replayed = grads(lambda a, b: checkpoint(_segment, a, b))
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == "float32" else dict(rtol=1e-12, atol=1e-12)  # cuBLAS reruns
    for got, expected in zip(replayed[:2], plain[:2]):  # a different mask would differ by O(1)
        np.testing.assert_allclose(got, expected, **tol)
    np.testing.assert_array_equal(replayed[2], plain[2])  # the stream carries on where it was
