"""[memory] activation_checkpointing = "auto" in data mode: each rank plans its own share's step before the
gradient hooks exist, stays under the budget, and the run trains exactly as with "none" (run under mpiexec
--with-mpi on 2 or 4 ranks)."""
import numpy as np
import pytest

from disttrain.models import protocol
from disttrain.parallel import DataParallelMode, world
from disttrain.train import Trainer
from disttrain.train.auto_checkpointing import held_bytes

pytestmark = pytest.mark.mpi(min_size=2)

JOB = """
[model]
hidden = 32
embed = 16
layers = 1
[data]
kind = "chars"
path = "{path}"
batch_size = 8
bptt = 96
[optim]
kind = "adam"
lr = 0.01
[train]
max_steps = 3
log_every = 1
checkpoint_every = 0
seed = 5
[parallel]
mode = "data"
bucket_mb = 0.002
"""


def train(spec):
    mode = DataParallelMode.from_spec(spec, world())
    trainer = Trainer.from_job(spec, mode=mode, progress=False)
    peaks = []
    batches = iter(trainer.train_iter)
    for _ in range(spec.train.max_steps):
        trainer._metered_step(*next(batches))
        peaks.append(trainer._acc["peak_mem_bytes"])
    mode.close()
    return trainer, max(peaks)


def test_auto_stays_under_the_budget_and_trains_as_none(char_job):
    job = char_job(JOB, 4000)
    plain, plain_peak = train(job())
    held = held_bytes(plain.model, plain.optimizer, plain.mode.memory_holding())   # gradient buckets included
    budget_mb = (held + max(world().allgather_object(plain_peak)) * 0.7) / 2**20
    auto, auto_peak = train(job("memory.activation_checkpointing=auto", f"memory.budget_mb={budget_mb}"))
    assert any(s.recompute for s in auto.checkpoint_choice.plan.segments)
    carried = sum(t.data.nbytes for t in protocol.state_tensors(auto.state))      # this rank's (h, c)
    assert auto.checkpoint_choice.held == held + carried and carried > 0
    assert held + carried + auto_peak <= budget_mb * 2**20, auto.checkpoint_choice.describe()
    for name, want in plain.model.state_dict().items():
        np.testing.assert_allclose(auto.model.state_dict()[name].numpy(), want.numpy(), rtol=2e-5, atol=1e-6,
                                   err_msg=name)
