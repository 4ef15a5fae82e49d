"""The optimizer's state moves between the "cuda" device and the CPU through state_dict."""
import numpy as np
import pytest

import disttrain as dt
from disttrain import optim

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not dt.cuda_available(), reason="needs a CUDA GPU")]


def _r(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


def test_optimizer_state_dict_round_trips_between_devices():
    p = dt.tensor(_r(5), device="cuda", requires_grad=True)
    opt = optim.Adam([p], lr=0.1)
    (p * p).sum().backward()
    opt.step()
    state = opt.state_dict()
    assert isinstance(state["state"][0]["exp_avg"], np.ndarray)
    q = dt.tensor(p.numpy(), requires_grad=True)
    opt_cpu = optim.Adam([q], lr=0.1)
    opt_cpu.load_state_dict(state)
    for o, t in ((opt, p), (opt_cpu, q)):
        o.zero_grad()
        (t * t).sum().backward()
        o.step()
    np.testing.assert_allclose(p.numpy(), q.numpy(), rtol=1e-6)
