"""The one-process Mode: its place among the data shares, how it builds an optimizer, scales the backward,
finds its device and checkpoint directory, and describes itself."""
import re

import numpy as np
import pytest

import disttrain as dt
import disttrain.nn.functional as F
from disttrain import nn
from disttrain.optim import SGD
from disttrain.train.mode import LocalMode, make_optimizer


def test_a_local_mode_is_the_one_share_of_every_batch():
    mode = LocalMode()
    share = mode.train_share()
    assert (mode.rank, mode.world_size) == (share.index, share.count) == (0, 1)
    assert mode.eval_share() == share


def test_make_optimizer_calls_a_factory_and_rebuilds_an_optimizer_over_other_parameters():
    model, other = nn.Linear(2, 3), nn.Linear(2, 3)
    built = make_optimizer(lambda params: SGD(params, lr=0.5), model.parameters())
    assert isinstance(built, SGD) and built.param_groups[0]["lr"] == 0.5
    rebuilt = make_optimizer(SGD(other.parameters(), lr=0.25), model.parameters())
    assert rebuilt.param_groups[0]["params"] == list(model.parameters()) and rebuilt.param_groups[0]["lr"] == 0.25


def test_something_neither_an_optimizer_nor_a_factory_is_named():
    with pytest.raises(TypeError, match=r"optimizer must be an Optimizer or a factory params -> Optimizer, not 0\.1"):
        make_optimizer(0.1, nn.Linear(2, 3).parameters())


def _grads_after(mode, opt, *args, **kwargs):
    opt.zero_grad()
    mode.forward_backward(*args, **kwargs)
    return [p.grad.numpy().copy() for p in mode.model.parameters()]


def test_backward_scales_the_gradients_only_when_asked():
    dt.manual_seed(0)
    mode = LocalMode()
    model, opt = mode.prepare(nn.Linear(3, 2).double(), lambda params: SGD(params, lr=0.1))
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((4, 3)), rng.integers(0, 2, 4)
    opt.zero_grad()
    F.cross_entropy(model(dt.tensor(x)), dt.tensor(y)).backward()
    want = [p.grad.numpy().copy() for p in model.parameters()]
    for kwargs, factor in [({}, 1.0), ({"backward_scale": 2.0}, 2.0), ({"backward_scale": 0.5}, 0.5)]:
        for got, g in zip(_grads_after(mode, opt, x, y, **kwargs), want):
            np.testing.assert_allclose(got, factor * g, rtol=1e-14, err_msg=str(kwargs))


class _Param:
    def __init__(self, device):
        self.device = device


class _Placed:
    """A model as far as Mode.device looks at it: its parameters' device."""

    def parameters(self):
        return [_Param("cuda:1")]


def test_the_device_is_the_models_and_cpu_before_a_model():
    mode = LocalMode()
    assert mode.device == "cpu"
    mode.prepare(_Placed(), lambda params: None)
    assert mode.device == "cuda:1"


def test_only_the_main_process_gets_a_checkpoint_dir_and_only_with_an_out_dir(tmp_path):
    mode = LocalMode()
    assert mode.checkpoint_dir(tmp_path) == tmp_path and mode.checkpoint_dir(None) is None
    mode.is_main = False
    assert mode.checkpoint_dir(tmp_path) is None


def test_the_start_line_names_the_blas_threads_of_a_cpu_process():
    line, = LocalMode().describe(20)
    assert re.fullmatch(r"local: 1 process, 20 streams a batch, (1 BLAS thread|\d+ BLAS threads)", line), line
