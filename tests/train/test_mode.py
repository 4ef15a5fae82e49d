"""The one-process Mode: its place among the data shares and how it builds an optimizer."""
import pytest

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
