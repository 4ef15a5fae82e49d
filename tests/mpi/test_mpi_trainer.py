"""The Trainer in DataParallelMode equals the Trainer in one process with the same global batch,
and every rank resumes from the checkpoint rank 0 wrote (run under mpiexec --with-mpi)."""
import numpy as np
import pytest

import disttrain as dt
from disttrain.autograd.ops import nn as nn_ops
from disttrain.parallel import DataParallelMode, world
from disttrain.tensor.random import step_stream
from disttrain.train import Trainer, load_checkpoint

pytestmark = pytest.mark.mpi(min_size=2)

JOB = """
[model]
hidden = 16
embed = 8
layers = 1
[data]
kind = "chars"
path = "{path}"
batch_size = 4
bptt = 6
[optim]
kind = "adam"
lr = 0.01
clip_norm = 0.5
[train]
epochs = 1
log_every = 2
checkpoint_every = 0
seed = 5
[parallel]
mode = "data"
bucket_mb = 0.002
"""


@pytest.fixture
def job(char_job):
    """job(*overrides) -> JobSpec of a tiny char LSTM (45 steps per epoch)."""
    return char_job(JOB, 1200)


def data_parallel_trainer(spec, out_dir=None, mode_class=DataParallelMode):
    mode = mode_class(world(), bucket_mb=spec.parallel.bucket_mb)
    trainer = Trainer.from_job(spec, out_dir=out_dir, mode=mode, progress=False)
    return trainer, mode


def weights(trainer):
    return {name: t.numpy().copy() for name, t in trainer.model.state_dict().items()}


def test_trainer_data_parallel_equals_local(job):
    spec = job("train.max_steps=6")
    trainer, mode = data_parallel_trainer(spec)
    evals = trainer.fit()
    got, shard_width = weights(trainer), trainer.train_iter.batch_size
    mode.close()
    local = Trainer.from_job(spec, progress=False)
    local_evals = local.fit()
    assert trainer.step == local.step == 6 and shard_width * world().size == 4
    for name, want in weights(local).items():
        np.testing.assert_allclose(got[name], want, rtol=1e-5, atol=1e-6, err_msg=name)
    assert evals["valid"].loss == pytest.approx(local_evals["valid"].loss, rel=1e-5)


def resume_and_compare(job, out, first, then):
    """Train `first` on every rank with rank 0 writing the checkpoint, resume on every rank to `then`;
    returns (files rank 0 wrote, resumed weights, weights of the same run without the stop)."""
    comm = world()
    trainer, mode = data_parallel_trainer(job(*first), out)
    trainer.fit()
    mode.close()
    comm.Barrier()                                       # rank 0 has written the checkpoint
    written = sorted(p.name for p in out.iterdir())
    resumed, mode = data_parallel_trainer(job(*then), out)
    resumed.restore(load_checkpoint(out))
    resumed.fit()
    got = weights(resumed)
    mode.close()
    straight, mode = data_parallel_trainer(job(*then))
    straight.fit()
    mode.close()
    return written, got, weights(straight)


def test_every_rank_resumes_from_rank_0_checkpoint(job, mpi_tmp_path):
    written, got, want = resume_and_compare(job, mpi_tmp_path / "run", ["train.epochs=1"], ["train.epochs=2"])
    assert "checkpoints" in written and "metrics.jsonl" in written
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_every_rank_resumes_mid_epoch(job, mpi_tmp_path):
    _, got, want = resume_and_compare(job, mpi_tmp_path / "run", ["train.max_steps=3"], ["train.max_steps=6"])
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


@pytest.mark.parametrize("batch", [10, 3])          # 3 streams on 4 ranks: one rank evaluates none
def test_evaluation_is_sharded_and_equals_local(job, batch, monkeypatch):
    import disttrain.data.source as source

    monkeypatch.setattr(source, "EVAL_STREAMS", batch)
    spec = job()
    trainer, mode = data_parallel_trainer(spec)
    evaluated = []
    monkeypatch.setattr(trainer.model, "forward", _recording(trainer.model.forward, evaluated))
    result = trainer.evaluate("valid")
    mode.close()
    local = Trainer.from_job(spec, progress=False).evaluate("valid")
    columns = sum(x.shape[1] for x in evaluated[:1])
    assert columns == len(np.array_split(np.arange(batch), world().size)[world().rank])   # this rank's share only
    assert result.tokens == local.tokens
    assert result.loss == pytest.approx(local.loss, rel=1e-6)


def _recording(forward, seen):
    def wrapper(tokens, state=None):
        seen.append(tokens)
        return forward(tokens, state)
    return wrapper


def test_a_stop_request_on_one_rank_stops_every_rank_after_the_same_step(job, mpi_tmp_path):
    comm = world()
    out = mpi_tmp_path / "stopped"
    trainer, mode = data_parallel_trainer(job("train.max_steps=20"), out)
    if comm.rank == comm.size - 1:               # only the last rank sees the signal, after its third step
        original = trainer._after_step

        def after_step():
            original()
            if trainer.step == 3:
                trainer.request_stop("SIGTERM")
        trainer._after_step = after_step
    from disttrain.train.loop import TrainingInterrupted

    with pytest.raises(TrainingInterrupted, match="after step 3"):
        trainer.fit()
    mode.close()
    comm.Barrier()
    assert load_checkpoint(out).meta["step"] == 3


class NanLossOnTheLastRank(DataParallelMode):
    """The last rank's loss of step 3 is NaN; its gradients, and so the global gradient norm, stay finite."""

    steps = 0

    def forward_backward(self, inputs, targets, state=None, backward_scale=1.0):
        loss, state = super().forward_backward(inputs, targets, state, backward_scale)
        self.steps += 1
        if self.comm.rank == self.comm.size - 1 and self.steps == 3:
            loss = float("nan")
        return loss, state


def test_a_nonfinite_loss_on_one_rank_skips_the_step_on_every_rank(job):
    comm = world()
    trainer, mode = data_parallel_trainer(job("train.max_steps=6", "train.on_nonfinite=skip"),
                                              mode_class=NanLossOnTheLastRank)
    trainer.fit()
    mode.close()
    adam_steps = {entry["step"] for entry in trainer.optimizer.state_dict()["state"].values()}
    assert trainer.step == 6 and adam_steps == {5}                        # step 3 applied nowhere
    mine = np.concatenate([a.ravel() for a in weights(trainer).values()])
    for other in comm.Allgather(mine):                                   # and the replicas still agree
        np.testing.assert_array_equal(other, mine)


def test_a_nonfinite_loss_on_one_rank_stops_every_rank(job, mpi_tmp_path):
    from disttrain.train.loop import TrainingDiverged

    out = mpi_tmp_path / "diverged"
    trainer, mode = data_parallel_trainer(job("train.max_steps=6", "train.checkpoint_every=2"), out,
                                              mode_class=NanLossOnTheLastRank)
    with pytest.raises(TrainingDiverged, match="^step 3: loss nan, gradient norm"):
        trainer.fit()
    mode.close()
    world().Barrier()
    assert load_checkpoint(out).meta["step"] == 2


class _Recording:
    """A generator that keeps a copy of the first 4 numbers of each draw."""

    def __init__(self, generator, draws):
        self.generator, self.draws = generator, draws

    def random(self, *args, **kwargs):
        out = self.generator.random(*args, **kwargs)
        self.draws.append(np.asarray(out).reshape(-1)[:4].copy())
        return out


def test_ranks_draw_their_own_dropout_masks_and_resume_exactly(job, mpi_tmp_path, monkeypatch):
    """Each rank's step draws from its own stream (equal masks on every rank would make the shares' dropout
    one mask repeated); the shared generators stay alike, so rank 0's checkpoint resumes every rank."""
    comm = world()
    with step_stream(comm.rank):
        mine = dt.rand(8).numpy()
    draws = comm.allgather_object(mine.tolist())
    assert all(not np.array_equal(draws[0], other) for other in draws[1:])
    assert len(set(comm.allgather_object(float(dt.rand(1).item())))) == 1
    dropout = ("model.layers=2", "model.dropout=0.5")
    masks = []
    real = nn_ops.generator
    monkeypatch.setattr(nn_ops, "generator", lambda backend: _Recording(real(backend), masks))
    trainer, mode = data_parallel_trainer(job("train.max_steps=1", *dropout))
    trainer.fit()
    mode.close()
    monkeypatch.undo()
    ranks_masks = comm.allgather_object([m.tolist() for m in masks])
    assert ranks_masks[0] and all(ranks_masks[0] != other for other in ranks_masks[1:])
    _, got, want = resume_and_compare(job, mpi_tmp_path / "run", ["train.max_steps=3", *dropout],
                                      ["train.max_steps=6", *dropout])
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
