"""dt.train.fit in data and pipeline mode equals fit in one process: the natural Python entry point for a
user's own model (an MLP) and data (ArrayData), run under mpiexec --with-mpi on 2 or 4 ranks."""
import numpy as np
import pytest

import disttrain as dt
from disttrain import nn
from disttrain.data.source import ArrayData
from disttrain.parallel import DataParallelMode, world
from disttrain.parallel.pipeline.pipeline_mode import PipelineMode
from disttrain.train import LocalMode, fit

pytestmark = pytest.mark.mpi(min_size=2)


def data():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 192)
    inputs = np.eye(3)[labels] @ rng.standard_normal((3, 5)) + 0.5 * rng.standard_normal((192, 5))
    return ArrayData(inputs, labels, batch_size=16, eval={"valid": (inputs[:48], labels[:48])}, shuffle=True)


def float64_data():
    source = data()
    source.inputs = source.inputs.astype(np.float64)
    source.eval = {k: (x.astype(np.float64), y) for k, (x, y) in source.eval.items()}
    return source


def trained(mode):
    dt.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 3))
    model.to(dtype="float64")
    source = float64_data()
    optimizer = dt.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    trainer = fit(model, source, optimizer, mode=mode, epochs=2, clip_norm=1.0, progress=False)
    return trainer, {name: t.numpy().copy() for name, t in trainer.model.state_dict().items()}


@pytest.mark.parametrize("make_mode", [lambda: DataParallelMode(world(), bucket_mb=0.0005),
                                       lambda: PipelineMode(world(), stages=2, micro_batches=2)],
                         ids=["data", "pipeline"])
def test_fit_in_a_parallel_mode_equals_one_process(make_mode):
    local, want = trained(LocalMode())
    trainer, got = trained(make_mode())
    assert trainer.step == local.step == 24
    assert got and set(got) <= set(want)
    for name, value in got.items():
        np.testing.assert_allclose(value, want[name], rtol=1e-12, atol=1e-13, err_msg=name)
    assert trainer.evals["valid"].loss == pytest.approx(local.evals["valid"].loss, rel=1e-12)


def test_ranks_given_different_settings_are_refused_by_name():
    rank = world().rank
    model = nn.Sequential(nn.Linear(5, 3))
    with pytest.raises(dt.train.JobSpecError, match=r"fit\(\): rank 1: its job differs from rank 0's: \[train\] "
                                                     r"max_steps = 7 \(rank 0: 5\)"):
        fit(model, data(), dt.optim.SGD(model.parameters(), lr=0.1), mode="data", max_steps=5 + 2 * (rank == 1),
            progress=False)


class RunningMean(nn.Module):
    """Shifts its input by the running mean of what it saw in training (a batch-norm-like buffer)."""

    def __init__(self, width):
        super().__init__()
        self.register_buffer("mean", dt.zeros(width, dtype="float64"))

    def forward(self, x):
        if self.training:
            self.mean.data[...] = 0.9 * self.mean.data + 0.1 * x.data.mean(axis=0)
        return x - self.mean


def running_mean_model():
    dt.manual_seed(1)
    return nn.Sequential(nn.Linear(5, 12), RunningMean(12), nn.Tanh(), nn.Linear(12, 3)).to(dtype="float64")


def valid_loss_alone(model, source):
    """`model`'s loss on the valid split in one process, in eval mode (its running statistics as they are)."""
    with dt.no_grad():
        model.eval()
        x, y = source.eval["valid"]
        return dt.nn.functional.cross_entropy(model(dt.tensor(x)), dt.tensor(y)).item()


def test_data_parallel_ranks_keep_rank_0s_buffers_so_evaluation_matches_the_checkpoint():
    """Each rank updates its running statistics from its own share; after every step they take rank 0's (torch
    DDP's broadcast_buffers), so the sharded evaluation and rank 0's checkpoint use the same ones."""
    model, source = running_mean_model(), float64_data()
    trainer = fit(model, source, dt.optim.SGD(model.parameters(), lr=0.1), mode="data", epochs=1, progress=False)
    means = world().allgather_object(model[1].mean.numpy().tolist())
    assert any(means[0]) and all(m == means[0] for m in means[1:])
    assert trainer.evals["valid"].loss == pytest.approx(valid_loss_alone(model, source), rel=1e-12)


def test_pipeline_replicas_keep_the_first_replicas_buffers_so_evaluation_matches_the_checkpoint(mpi_tmp_path):
    """Each pipeline replica updates a stage's running statistics from its own share; after every step the stage's
    replicas take the first replica's, as data-parallel ranks take rank 0's, so every replica evaluates with the
    buffers of rank 0's checkpoint. 2 stages x 2 replicas on 4 ranks (the buffer in stage 0), 1 x 2 on 2."""
    stages = world().size // 2
    model, source = running_mean_model(), float64_data()
    mode = PipelineMode(world(), stages=stages, micro_batches=2, split_points=[2] if stages == 2 else None)
    trainer = fit(model, source, dt.optim.SGD(model.parameters(), lr=0.1), mode=mode, epochs=1,
                  out_dir=mpi_tmp_path / "run", progress=False)
    buffers = [b.numpy().tolist() for b in trainer.model.buffers()]
    per_rank = world().allgather_object((mode.stage, buffers))
    same_stage = [theirs for stage, theirs in per_rank if stage == mode.stage]
    assert all(theirs == same_stage[0] for theirs in same_stage[1:])
    from_checkpoint = running_mean_model()
    from_checkpoint.load_state_dict({name: dt.tensor(a) for name, a in
                                     dt.train.saving.load_checkpoint(mpi_tmp_path / "run").model.items()})
    assert np.any(from_checkpoint[1].mean.numpy())
    assert trainer.evals["valid"].loss == pytest.approx(valid_loss_alone(from_checkpoint, source), rel=1e-12)
