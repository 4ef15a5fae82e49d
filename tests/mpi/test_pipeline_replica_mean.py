"""The pipeline's data-parallel replicas average their gradients: with plain SGD, no clipping and the mean loss
per token, each step's update equals the one-process update exactly, so a sum over replicas (an update D
times too large) or any other constant factor shows. Run under mpiexec --with-mpi on 2 or 4 ranks."""
import numpy as np
import pytest

from disttrain.parallel import world
from disttrain.parallel.pipeline.pipeline_mode import PipelineMode
from disttrain.train import Trainer

pytestmark = pytest.mark.mpi(min_size=2)

# no clip_norm, no momentum, token_mean: the update is lr times the gradient, linear in its scale
JOB = """
[model]
hidden = 12
embed = 8
layers = 2
[data]
kind = "chars"
path = "{path}"
batch_size = 8
bptt = 5
[optim]
kind = "sgd"
lr = 0.5
loss = "token_mean"
[train]
max_steps = 3
log_every = 100
eval_every = 100
checkpoint_every = 0
seed = 5
[parallel]
mode = "pipeline"
micro_batches = 2
"""


def stage_counts():
    """Every K with K x D = world size and K <= 4 (the model has 4 blocks): 1x2 and 2x1 on 2 ranks; 1x4, 2x2 and
    4x1 on 4."""
    size = world().size
    return [k for k in range(1, min(size, 4) + 1) if size % k == 0]


def weights(trainer):
    return {name: t.numpy().copy() for name, t in trainer.model.state_dict().items()}


def updates_after_steps(trainer, steps):
    """{name: weights after `steps` train steps - weights before} of this trainer's parameters."""
    before = weights(trainer)
    for step, (x, y) in enumerate(trainer.train_iter):
        if step == steps:
            break
        trainer.train_step(x, y)
    return {name: value - before[name] for name, value in weights(trainer).items()}


@pytest.fixture
def job(char_job):
    return char_job(JOB, 1500)


def test_replicas_average_their_gradients(job):
    want = updates_after_steps(Trainer.from_job(job("parallel.mode=local"), progress=False), 2)
    wrong = []                                   # every layout is checked, so a failure names all that differ
    for stages in stage_counts():
        spec = job(f"parallel.stages={stages}")
        trainer = Trainer.from_job(spec, mode=PipelineMode.from_spec(spec, world()), progress=False)
        layout = f"{stages} stages x {trainer.mode.replicas} replicas"
        got = updates_after_steps(trainer, 2)
        assert got and set(got) <= set(want), layout
        for name, update in got.items():
            # float32 weights: the update, a difference of two weights, is exact to ~1e-7 of the weights; a
            # scale error moves every entry by a multiple of itself, the largest by a multiple of `size`
            size = np.abs(want[name]).max()
            assert size > 0, f"{name} did not move in the one-process run"
            if not np.allclose(update, want[name], rtol=1e-3, atol=1e-3 * size):
                ratio = np.abs(update).max() / size
                wrong.append(f"{layout}: {name} moved {ratio:.3g} times as far as in one process (largest entries)")
    assert not wrong, "\n".join(wrong)
