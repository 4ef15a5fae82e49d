"""Activation checkpointing under DataParallel: the recomputation in backward must not disturb the grad-ready
callbacks the buckets are built on. Every parameter's post-accumulate-grad hook fires exactly once per
backward pass (once its gradient is final, however many checkpointed segments use it), and training equals
DataParallel without checkpointing. Run under mpiexec --with-mpi on 2 or 4 ranks.

Each rank finishes all its collectives before it asserts, so a failing rank leaves no other waiting.
"""
import numpy as np
import pytest

import disttrain as dt
import disttrain.nn.functional as F
from disttrain import nn
from disttrain.checkpointing import apply_activation_checkpointing
from disttrain.models import LSTMLanguageModel
from disttrain.parallel import DataParallel, world

pytestmark = pytest.mark.mpi(min_size=2)

STEPS, B = 3, 8                       # B: the global batch, B / N per rank


class TiedChain(nn.Module):
    """A Sequential of 12 modules in which one Linear appears three times (so in several checkpointed
    segments), then a head."""

    def __init__(self):
        super().__init__()
        shared = nn.Linear(6, 6)
        layers = []
        for k in range(3):
            layers += [nn.Linear(6, 6), nn.Tanh(), shared, nn.Tanh()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        return self.head(self.body(x))


def tied_chain():
    dt.manual_seed(3)
    return TiedChain().double()


def chain_loss(model, x, y):
    return F.cross_entropy(model(dt.tensor(x)), dt.tensor(y))


def chain_batches(rng):
    return [(rng.standard_normal((B, 6)), rng.integers(0, 4, B)) for _ in range(STEPS)]


VOCAB, T = 11, 9


def language_model():
    dt.manual_seed(4)
    return LSTMLanguageModel(VOCAB, hidden=6, layers=2, embed=5).double()


def lm_loss(model, x, y):
    return model.forward_loss(dt.tensor(x), dt.tensor(y))[0]


def lm_batches(rng):
    return [(rng.integers(0, VOCAB, (T, B)), rng.integers(0, VOCAB, (T, B))) for _ in range(STEPS)]


MODELS = {"tied chain": (tied_chain, chain_loss, chain_batches, 0),
          "LSTM language model": (language_model, lm_loss, lm_batches, 1)}


def rank_share(array, comm, axis):
    n = array.shape[axis] // comm.size
    return np.ascontiguousarray(np.take(array, range(comm.rank * n, (comm.rank + 1) * n), axis=axis))


def train_data_parallel(name, segments, checkpoint_nodes):
    """(parameters after STEPS SGD steps, per step {parameter name: hook calls}, checkpoint nodes per step) for
    one DataParallel run, in the natural loop (backward returns with averaged gradients), and per step
    (synchronisations so far, pending after backward)."""
    make, loss_fn, make_batches, batch_axis = MODELS[name]
    comm = world()
    model = make()
    if segments is not None:
        apply_activation_checkpointing(model, segments)
    opt = dt.optim.SGD(model.parameters(), lr=0.3)
    dp = DataParallel(model, comm, bucket_mb=1e-4, optimizer=opt)      # a bucket per parameter or two
    fired = {}
    for pname, p in model.named_parameters():
        p.register_post_accumulate_grad_hook(lambda _, pname=pname: fired.__setitem__(pname, fired[pname] + 1))
    counts, nodes, syncs = [], [], []
    try:
        for x, y in make_batches(np.random.default_rng(9)):
            fired.update({pname: 0 for pname, _ in model.named_parameters()})
            opt.zero_grad()
            loss = loss_fn(dp.module, rank_share(x, comm, batch_axis), rank_share(y, comm, batch_axis))
            nodes.append(checkpoint_nodes(loss))
            loss.backward()
            counts.append(dict(fired))
            syncs.append((dp.reducer.syncs, dp.pending()))
            opt.step()
        return {pname: p.numpy().copy() for pname, p in model.named_parameters()}, counts, nodes, syncs
    finally:
        dp.close()


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("segments", ["sqrt", 2])
def test_checkpointed_data_parallel_fires_each_hook_once_and_equals_plain(name, segments, checkpoint_nodes):
    plain, plain_counts, plain_nodes, plain_syncs = train_data_parallel(name, None, checkpoint_nodes)
    got, counts, nodes, syncs = train_data_parallel(name, segments, checkpoint_nodes)
    assert len(counts) == STEPS
    assert plain_syncs == syncs == [(step, False) for step in range(1, STEPS + 1)]    # once per backward
    assert plain_nodes == [0] * STEPS and min(nodes) >= 1, nodes          # segments were checkpointed
    for step, fired in enumerate(plain_counts + counts):
        assert set(fired.values()) == {1}, f"step {step % STEPS}: hook calls per parameter {fired}"
    for pname, want in plain.items():
        np.testing.assert_allclose(got[pname], want, rtol=1e-11, atol=1e-13, err_msg=pname)
