"""Users' own nn.Sequential models in pipeline mode (dt.train.fit with PipelineMode) equal one process: a module
placed at two positions, buffers that count forwards, frozen first layers (run under mpiexec --with-mpi on 2 or 4
ranks)."""
import numpy as np
import pytest

import disttrain as dt
from disttrain import nn
from disttrain.data.source import ArrayData
from disttrain.parallel import world
from disttrain.parallel.pipeline.pipeline_mode import PipelineMode
from disttrain.train import LocalMode, fit

pytestmark = pytest.mark.mpi(min_size=2)


def data():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 96)
    inputs = np.eye(3)[labels] @ rng.standard_normal((3, 6)) + 0.5 * rng.standard_normal((96, 6))
    source = ArrayData(inputs, labels, batch_size=16, eval={"valid": (inputs[:32], labels[:32])}, shuffle=True)
    source.inputs = source.inputs.astype(np.float64)       # float64 models: equal to one process to rounding
    source.eval = {k: (x.astype(np.float64), y) for k, (x, y) in source.eval.items()}
    return source


class Counter(nn.Module):
    """Counts its training forwards in a persistent and a non-persistent buffer (as running statistics do)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("seen", dt.zeros(1, dtype="float64"))
        self.register_buffer("calls", dt.zeros(1, dtype="float64"), persistent=False)

    def forward(self, x):
        if self.training:
            with dt.no_grad():
                self.seen.add_(1.0)
                self.calls.add_(1.0)
        return x


def reused_activation():
    act = nn.Tanh()
    return nn.Sequential(nn.Linear(6, 8), act, nn.Linear(8, 8), act, nn.Linear(8, 3))


def shared_linear():
    shared = nn.Linear(8, 8)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), shared, nn.Tanh(), shared, nn.Tanh(), nn.Linear(8, 3))


def counting():
    return nn.Sequential(nn.Linear(6, 8), Counter(), nn.Tanh(), nn.Linear(8, 8), Counter(), nn.Tanh(), nn.Linear(8, 3))


def frozen_first_layers():
    """Seven blocks; the first two Linears frozen, so that the first stages (split after every second block)
    have no trainable parameters and their inputs need no gradient."""
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(),
                          nn.Linear(8, 3))
    for layer in (model[0], model[2]):
        layer.weight.requires_grad_(False)
        layer.bias.requires_grad_(False)
    return model


def trained(make, mode):
    dt.manual_seed(1)
    model = make().to(dtype="float64")
    source = data()
    optimizer = dt.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    trainer = fit(model, source, optimizer, mode=mode, epochs=2, progress=False)
    return trainer


def stage_entries(trainer):
    return {name: t.numpy().copy() for name, t in trainer.model.state_dict().items()}


def assert_equal_to_one_process(make, mode, local_entries=None):
    local = trained(make, LocalMode())
    want = local_entries(local) if local_entries else stage_entries(local)
    trainer = trained(make, mode)
    got = stage_entries(trainer) if local_entries is None else local_entries(trainer)
    assert trainer.step == local.step == 12
    every = world().allgather_object(sorted(got))
    assert set().union(*every) == set(want)            # the stages hold every entry the whole model has
    for name, value in got.items():
        np.testing.assert_allclose(value, want[name], rtol=1e-12, atol=1e-13, err_msg=name)
    assert trainer.evals["valid"].loss == pytest.approx(local.evals["valid"].loss, rel=1e-12)
    return trainer, local


@pytest.mark.parametrize("make", [reused_activation, shared_linear])
def test_a_module_at_two_positions_is_a_block_at_each(make):
    trainer, local = assert_equal_to_one_process(make, PipelineMode(world(), stages=2, micro_batches=2))
    assert trainer.mode.partition.block_names == [str(i) for i in range(len(local.model))]
    keys = world().allgather_object(sorted(trainer.model.state_dict()))
    if make is shared_linear:                                           # both uses of the Linear on one stage
        assert any({"2.weight", "4.weight"} <= set(k) for k in keys)


def test_buffers_count_the_training_forwards_only():
    """The start-up measurements (the balancer's profile, the stage's step memory) leave every buffer as it was."""
    def buffers(trainer):
        return {name: b.numpy().copy() for name, b in trainer.model.named_buffers()}

    trainer, _ = assert_equal_to_one_process(counting, PipelineMode(world(), stages=2, micro_batches=1), buffers)
    assert all(value[0] == 12 for value in buffers(trainer).values())


def test_frozen_first_stages_run_no_backward_and_train_the_rest_as_one_process():
    stages = world().size if world().size <= 4 else 2
    points = {2: ["2"], 4: ["2", "4", "6"]}[stages]
    trainer, _ = assert_equal_to_one_process(frozen_first_layers, PipelineMode(world(), stages=stages, micro_batches=2,
                                                                               split_points=points))
    assert trainer.mode.partition.bounds[1] == 2
