"""sync mode with one worker is local training, bit for bit; with two workers, SGD on the combined batch."""

import numpy as np
import pytest

import disttrain as dt
from disttrain.data.source import Share
from disttrain.nn import functional as F
from disttrain.paramserver.job import push_weight
from disttrain.paramserver.worker import PSClient
from disttrain.train.loop import Trainer
from disttrain.train.mode import LocalMode

from ps_testing import (adam_factory, flat_grads, flat_targets, layout_of, make_mlp, running_servers, sgd_factory,
                        train_worker_0, worker_clients)
from ps_user_models import user_job

STEPS = 25


def batches(n, size=16, seed=1):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((size, 6)), rng.integers(0, 3, size)) for _ in range(n)]


def loss_of(model, x, y):
    return F.cross_entropy(model(dt.tensor(x)), dt.tensor(y))


@pytest.mark.parametrize("servers", [1, 3])
@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_one_worker_sync_equals_local_float64(kind, servers):
    make = (sgd_factory(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3) if kind == "sgd"
            else adam_factory(lr=0.01, weight_decay=1e-3, amsgrad=True))
    local, remote = make_mlp(), make_mlp()
    local_opt, _ = make(list(local.parameters()))
    layout = layout_of(remote, servers)
    initial = [p.numpy().copy() for p in remote.parameters()]
    with running_servers(layout, initial, make, {"consistency": "sync"}) as (_, endpoints):
        client = PSClient(endpoints, layout, 0, heartbeat_interval=0.2)
        client.connect(flat_targets(remote.parameters()))
        try:
            for x, y in batches(STEPS):
                local_opt.zero_grad()
                loss_of(local, x, y).backward()
                local_opt.step()
                for p in remote.parameters():
                    p.grad = None
                loss_of(remote, x, y).backward()
                client.push(flat_grads(remote.parameters()), pull=True)
            stats = client.stats(0)
        finally:
            client.leave()
            client.close()
    assert stats["updates"] == STEPS and stats["round"] == STEPS
    for a, b in zip(local.parameters(), remote.parameters()):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_two_workers_sync_is_sgd_on_the_combined_batch():
    local, w0, w1 = make_mlp(), make_mlp(), make_mlp()
    make = sgd_factory(lr=0.1, momentum=0.5)
    local_opt, _ = make(list(local.parameters()))
    layout = layout_of(w0, 2)
    initial = [p.numpy().copy() for p in w0.parameters()]
    with running_servers(layout, initial, make, {"consistency": "sync"}) as (_, endpoints), \
            worker_clients(endpoints, layout, (w0, w1)) as clients:
        for x, y in batches(10, size=16):
            local_opt.zero_grad()
            loss_of(local, x, y).backward()
            local_opt.step()
            handles = []
            for c, m, half in zip(clients, (w0, w1), (slice(0, 8), slice(8, 16))):
                for p in m.parameters():
                    p.grad = None
                loss_of(m, x[half], y[half]).backward()
                handles.append(c.push_async(flat_grads(m.parameters()), pull=True))
            for c, h in zip(clients, handles):     # worker 0's answer waits for worker 1's push
                c.wait(h)
    for a, b, c in zip(local.parameters(), w0.parameters(), w1.parameters()):
        np.testing.assert_array_equal(b.numpy(), c.numpy())                 # both workers hold the same state
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=0, atol=1e-13)  # mean of halves = mean of batch


def test_trainer_worker_sync_equals_local_trainer(ps_job):
    """The whole stack: job -> servers (2) + Trainer with PSStrategy/RemoteOptimizer, LR warm-up and epoch decay."""
    spec, _ = ps_job("ps.consistency=sync", "ps.servers=2", "ps.workers=1", "optim.kind=sgd", "optim.lr=0.5",
                     "optim.momentum=0.9", "optim.warmup_steps=5", "optim.decay_after_epoch=1", "optim.decay=0.5",
                     "train.epochs=2", n_chars=1500)
    local = Trainer.from_job(spec, out_dir=None, progress=False)
    local.fit()
    trainer, servers, evals = train_worker_0(spec, 2)
    assert trainer.step == local.step and servers[0].updates == local.step
    assert servers[0].epoch == 1                                    # the epoch decay ran once on the servers
    for (name, a), b in zip(local.model.named_parameters(), trainer.params):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=name)
    assert evals["valid"].loss == local.evals["valid"].loss
    assert trainer.step_lr == local.step_lr                       # the lr of the last step, as reported


def test_scaled_async_push_is_a_share_of_a_step(ps_job):
    """scale_pushes: a worker holding 1 of 2 shards pushes half its gradient. With SGD + momentum (linear in the
    gradient) that equals local training on the same shard at half the learning rate, bit for bit (x 0.5 is
    exact), and the Trainer's own gradients are not scaled."""
    spec, _ = ps_job("ps.consistency=async", "ps.overlap=false", "ps.servers=2", "ps.workers=2", "optim.kind=sgd",
                     "optim.lr=0.5", "optim.momentum=0.9", "train.epochs=1", n_chars=1500)
    assert push_weight(spec.ps, 2) == 0.5
    half_lr, _ = ps_job("optim.kind=sgd", "optim.lr=0.25", "optim.momentum=0.9", "train.epochs=1", n_chars=1500)
    local = Trainer.from_job(half_lr, out_dir=None, mode=FirstOfTwoShares(), progress=False)
    local.fit()
    trainer, servers, _ = train_worker_0(spec, 2, num_shards=2)
    assert trainer.step == local.step == servers[0].updates
    for (name, a), b in zip(local.model.named_parameters(), trainer.params):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=name)
        np.testing.assert_array_equal(a.grad.numpy(), b.grad.numpy(), err_msg=name)   # the last step's, unscaled


@pytest.mark.parametrize("model", ["frozen", "branchy"])
def test_one_worker_sync_equals_local_where_parameters_get_no_gradient(model):
    """A frozen layer, and branches each unused every other step: AdamW with weight decay must leave a
    parameter without a gradient alone on the servers as the local optimizer does (no decay, no moments)."""
    spec = user_job(model, "ps.consistency=sync", "ps.servers=2", "ps.workers=1")
    local = Trainer.from_job(spec, out_dir=None, progress=False)
    initial = {name: p.numpy().copy() for name, p in local.model.named_parameters()}
    local.fit()
    trainer, servers, evals = train_worker_0(spec, 2)
    assert trainer.step == local.step == servers[0].updates == 40
    for (name, a), b in zip(local.model.named_parameters(), trainer.params):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=name)
    if model == "frozen":
        for name in ("0.weight", "0.bias"):
            np.testing.assert_array_equal(dict(local.model.named_parameters())[name].numpy(), initial[name])
    assert evals["valid"].loss == local.evals["valid"].loss


class FirstOfTwoShares(LocalMode):
    """One process training on share 0 of 2 of every batch, as PS worker 0 of 2 does."""

    def train_share(self):
        return Share(0, 2)


@pytest.mark.parametrize("consistency,scale,expected", [("async", True, 0.25), ("ssp", True, 0.25),
                                                         ("sync", True, 1.0), ("async", False, 1.0)])
def test_push_weight(ps_job, consistency, scale, expected):
    spec, _ = ps_job(f"ps.consistency={consistency}", f"ps.scale_pushes={str(scale).lower()}")
    assert push_weight(spec.ps, 4) == expected
