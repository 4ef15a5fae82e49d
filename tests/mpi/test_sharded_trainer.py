"""The Trainer in data mode with [parallel] shard_optimizer = 1 or 2 (ZeRO) trains exactly as without it, and
its checkpoints, which hold the whole optimizer state, resume at another world size and sharding (run under
mpiexec --with-mpi on 2 or 4 ranks)."""
import numpy as np
import pytest

from disttrain.parallel import DataParallelMode, world
from disttrain.train import Trainer, load_checkpoint
from tiny_jobs import tiny_job

pytestmark = pytest.mark.mpi(min_size=2)

# the tiny job (tests/tiny_jobs.py) on 2 layers with warm-up, checkpoints and SGD with momentum (sharded state)
# clipped at every step: unlike Adam's, its updates follow the gradient's scale, so a wrong global norm shows
SHARDED_JOB = ("model.layers=2", "model.embed=8", "optim.kind=sgd", "optim.lr=0.5", "optim.momentum=0.9",
               "optim.clip_norm=0.05", "optim.warmup_steps=3", "train.max_steps=6", "train.log_every=2",
               "train.checkpoint_every=3", "train.seed=5", "parallel.mode=data", "parallel.bucket_mb=0.002")


@pytest.fixture
def job(mpi_tmp_path):
    return lambda *overrides: tiny_job(*SHARDED_JOB, *overrides, source=str(mpi_tmp_path / "tiny.toml"))


def weights(trainer):
    return {name: t.numpy().copy() for name, t in trainer.model.state_dict().items()}


def train(spec, out=None, resume=False):
    mode = DataParallelMode.from_spec(spec, world())
    trainer = Trainer.from_job(spec, out_dir=out, mode=mode, progress=False, overwrite=not resume)
    if resume:
        trainer.restore(load_checkpoint(out))
    trainer.fit()
    mode.close()
    return trainer


@pytest.mark.parametrize("stage", [1, 2])
def test_sharded_optimizer_state_trains_as_unsharded(job, stage):
    plain = train(job())
    sharded = train(job(f"parallel.shard_optimizer={stage}"))
    whole = sum(a.nbytes for entry in plain.optimizer.state.values() for a in entry.values() if hasattr(a, "nbytes"))
    assert sharded.optimizer.state_nbytes() <= whole / world().size * 1.05 + 1024    # this rank's slice only
    want, got = weights(plain), weights(sharded)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=2e-5, atol=1e-6, err_msg=name)
    assert sharded.evals["valid"].loss == pytest.approx(plain.evals["valid"].loss, rel=1e-5)


def test_a_sharded_checkpoint_holds_the_whole_state_and_resumes_unsharded(job, mpi_tmp_path):
    out = mpi_tmp_path / "sharded"
    train(job("parallel.shard_optimizer=2", "train.max_steps=3"), out)
    world().Barrier()
    saved = load_checkpoint(out)
    moments = [a for n, a in saved.arrays.items() if n.startswith("optimizer.") and n.endswith(".momentum_buffer")]
    assert len(moments) == len(saved.model) and sum(a.size for a in moments) == sum(
        a.size for a in saved.model.values())                          # every parameter's, whole, not a slice
    resumed = train(job("parallel.shard_optimizer=0"), out, resume=True)
    straight = train(job())
    for name, want in weights(straight).items():
        np.testing.assert_allclose(weights(resumed)[name], want, rtol=2e-5, atol=1e-6, err_msg=name)

