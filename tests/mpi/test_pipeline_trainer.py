"""The Trainer in PipelineMode (K stages x D replicas) equals the Trainer in one process, and resumes
from the whole-model checkpoint rank 0 wrote (run under mpiexec --with-mpi on 2 or 4 ranks)."""
import numpy as np
import pytest

from disttrain.parallel import world
from disttrain.parallel.pipeline.pipeline_mode import PipelineMode
from disttrain.train import Trainer, load_checkpoint

pytestmark = pytest.mark.mpi(min_size=2)

JOB = """
[model]
hidden = 12
embed = 8
layers = 2
[data]
kind = "chars"
path = "{path}"
batch_size = 4
bptt = 6
[optim]
kind = "adam"
lr = 0.01
clip_norm = 0.5
loss = "sum_over_time"
[train]
max_steps = 5
log_every = 2
eval_every = 4
checkpoint_every = 0
seed = 3
[parallel]
mode = "pipeline"
micro_batches = 2
"""


def layouts():
    """Stages for every layout this world allows: one pipeline over all ranks, and 2 stages x size/2 replicas."""
    size = world().size
    return [size] + ([2] if size > 2 and size % 2 == 0 else [])


@pytest.fixture
def job(char_job):
    return char_job(JOB, 1500)


def pipeline_trainer(spec, out_dir=None):
    return Trainer.from_job(spec, out_dir=out_dir, mode=PipelineMode.from_spec(spec, world()), progress=False)


def weights(trainer):
    return {name: t.numpy().copy() for name, t in trainer.model.state_dict().items()}


def whole_weights(trainer):
    """The whole model's weights, from every stage: rank 0 cuts the model where its measured costs balance, so
    two pipeline trainers may cut it differently and hold different blocks on the same rank."""
    merged = {}
    for stage_weights in world().allgather_object({k: v.tolist() for k, v in weights(trainer).items()}):
        merged.update(stage_weights)
    return {name: np.array(value) for name, value in merged.items()}


@pytest.mark.parametrize("schedule,recompute", [("1f1b", False), ("gpipe", True)])
def test_trainer_pipeline_equals_local(job, schedule, recompute):
    local_spec = job("parallel.mode=local")
    local = Trainer.from_job(local_spec, progress=False)
    local_losses = [local.train_step(x, y)[0] for x, y in _segments(local, 5)]
    local_valid = local.evaluate("valid").loss
    want = weights(local)
    for stages in layouts():
        spec = job(f"parallel.stages={stages}", f"parallel.schedule={schedule}",
                   f"parallel.stage_checkpointing={str(recompute).lower()}")
        trainer = pipeline_trainer(spec)
        losses = [trainer.train_step(x, y)[0] for x, y in _segments(trainer, 5)]
        valid = trainer.evaluate("valid").loss
        got = weights(trainer)
        # a replica's loss is its streams' mean: the mean over replicas is the global batch's
        losses = [trainer.mode.reduce([v], "mean")[0] for v in losses]
        np.testing.assert_allclose(losses, local_losses, rtol=1e-5)
        assert valid == pytest.approx(local_valid, rel=1e-5)
        assert got and set(got) <= set(want)
        for name, value in got.items():
            np.testing.assert_allclose(value, want[name], rtol=1e-4, atol=1e-5, err_msg=name)


def _segments(trainer, count):
    out = []
    for x, y in trainer.train_iter:
        out.append((x, y))
        if len(out) == count:
            return out
    return out


def test_resume_from_the_whole_model_checkpoint(job, mpi_tmp_path):
    comm = world()
    for stages in layouts():
        out = mpi_tmp_path / f"run{stages}"
        first = pipeline_trainer(job(f"parallel.stages={stages}", "train.max_steps=3"), out)
        first.fit()
        comm.Barrier()                                   # rank 0 has written the checkpoint
        checkpoint = load_checkpoint(out)
        assert len(checkpoint.model) == len(Trainer.from_job(job("parallel.mode=local"), progress=False).model.state_dict())
        resumed = pipeline_trainer(job(f"parallel.stages={stages}", "train.max_steps=6"), out)
        resumed.restore(checkpoint)
        resumed.fit()
        straight = pipeline_trainer(job(f"parallel.stages={stages}", "train.max_steps=6"))
        straight.fit()
        got, want = whole_weights(resumed), whole_weights(straight)
        assert sorted(got) == sorted(want)
        for name in want:
            np.testing.assert_array_equal(got[name], want[name], err_msg=name)
        # the checkpoint is a whole-model one: a local run resumes from it too (weights, Adam state, carried state)
        local = Trainer.from_job(job("parallel.mode=local", "train.max_steps=6"), progress=False)
        local.restore(checkpoint)
        local.fit()
        for name, value in weights(local).items():
            if name in want:
                np.testing.assert_allclose(value, want[name], rtol=1e-4, atol=1e-5, err_msg=name)
        comm.Barrier()
