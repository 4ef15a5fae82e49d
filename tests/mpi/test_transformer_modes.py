"""The Transformer LM, the second model family, trains in data and pipeline mode exactly as in one process:
the same equivalence tests the LSTM LM has (run under mpiexec --with-mpi on 2 or 4 ranks).

SGD, not Adam: the attention's key bias gets a gradient of exactly zero in theory (a softmax ignores what is
added to a whole row), so float32 rounding leaves it noise of 1e-10 that Adam would blow up to steps of the
learning rate, different in every summation order."""
import numpy as np
import pytest

from disttrain.parallel import DataParallelMode, world
from disttrain.parallel.pipeline.pipeline_mode import PipelineMode
from disttrain.train import Trainer

pytestmark = pytest.mark.mpi(min_size=2)

JOB = """
[model]
kind = "transformer_lm"
d_model = 16
heads = 2
layers = 2
d_ff = 32
max_len = 8
dropout = 0.0
[data]
kind = "chars"
path = "{path}"
batch_size = 4
bptt = 6
[optim]
kind = "sgd"
lr = 0.3
momentum = 0.9
clip_norm = 0.5
[train]
max_steps = 4
log_every = 2
eval_every = 4
checkpoint_every = 0
seed = 7
"""


@pytest.fixture
def job(char_job):
    return char_job(JOB, 1200)


def weights(trainer):
    return {name: t.numpy().copy() for name, t in trainer.model.state_dict().items()}


def local_run(spec):
    trainer = Trainer.from_job(spec, progress=False)
    losses = [trainer.train_step(x, y)[0] for x, y in segments(trainer, 4)]
    return losses, trainer.evaluate("valid").loss, weights(trainer)


def segments(trainer, n):
    batches = iter(trainer.train_iter)
    return [next(batches) for _ in range(n)]


def test_data_parallel_transformer_equals_one_process(job):
    spec = job("parallel.mode=data")
    want_losses, want_valid, want = local_run(job())
    mode = DataParallelMode(world(), bucket_mb=0.001)
    trainer = Trainer.from_job(spec, mode=mode, progress=False)
    losses = [mode.reduce([trainer.train_step(x, y)[0]], "mean")[0] for x, y in segments(trainer, 4)]
    valid = trainer.evaluate("valid").loss
    mode.close()
    np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
    assert valid == pytest.approx(want_valid, rel=1e-5)
    for name, value in weights(trainer).items():
        np.testing.assert_allclose(value, want[name], rtol=1e-4, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("schedule,recompute", [("1f1b", False), ("gpipe", True)])
def test_pipeline_transformer_equals_one_process(job, schedule, recompute):
    size = world().size
    want_losses, want_valid, want = local_run(job())
    for stages in [size] + ([2] if size > 2 and size % 2 == 0 else []):
        replicas = size // stages
        micro = 1 if replicas == 1 else 2
        spec = job("parallel.mode=pipeline", f"parallel.stages={stages}", f"parallel.schedule={schedule}",
                   f"parallel.micro_batches={micro}", f"parallel.stage_checkpointing={str(recompute).lower()}")
        mode = PipelineMode.from_spec(spec, world())
        trainer = Trainer.from_job(spec, mode=mode, progress=False)
        losses = [mode.reduce([trainer.train_step(x, y)[0]], "mean")[0] for x, y in segments(trainer, 4)]
        valid = trainer.evaluate("valid").loss
        got = weights(trainer)
        np.testing.assert_allclose(losses, want_losses, rtol=1e-5, err_msg=f"{stages} stages")
        assert valid == pytest.approx(want_valid, rel=1e-5)
        assert got and set(got) <= set(want)
        for name, value in got.items():
            np.testing.assert_allclose(value, want[name], rtol=1e-4, atol=1e-6, err_msg=name)
