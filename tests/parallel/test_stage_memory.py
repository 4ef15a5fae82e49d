"""stage_memory.replay: a pipeline stage's step peak from one micro-batch's measured figures, walked over its
schedule's actions (the measurement itself is held to the measured peak in tests/mpi/test_memory_estimate_pipeline.py),
and measuring a stage leaves no trace."""
from dataclasses import replace

import numpy as np

import pytest

import disttrain as dt
from disttrain import nn
from disttrain.models import protocol
from disttrain.models.transformer_lm import TransformerLanguageModel
from disttrain.parallel.pipeline.partition import CutError, partition
from disttrain.parallel.pipeline.schedule import stage_actions
from disttrain.parallel.pipeline.stage_memory import MicroBatchMemory, replay, stage_step_bytes
from user_models import Pair, Sum

# a middle stage: receive buffer 10, gradient receive 5, forward keeps 100 (peak 120); the first backward frees
# the 100, the input buffer and the gradient receive, adds 40 of gradients and 10 + 5 sent (peak 60 above the
# live bytes); later backwards add nothing to the gradients (peak 30)
COSTS = MicroBatchMemory(received=10, gradient_received=5, forward_peak=120, keep=100, first_backward_peak=60,
                         first_backward_change=-100 - 10 - 5 + 40 + 15, backward_peak=30,
                         backward_change=-100 - 10 - 5 + 15, gradients=40)


def test_gpipe_holds_every_micro_batch_before_the_first_backward():
    need = replay(stage_actions("gpipe", 3, 4, 1), COSTS, 4)
    # 4 receives posted (40); after 4 forwards 40 + 4 x 105 = 460, the first backward peaks 60 above that
    assert (need.peak, need.in_flight, need.per_micro_batch) == (520, 4, 115)


def test_1f1b_holds_fewer_and_the_replicas_mean_adds_the_gradients_at_the_end():
    actions = stage_actions("1f1b", 3, 4, 1)     # stage 1 of 3: F0 F1 B0 F2 B1 F3 B2 B3, 2 in flight at most
    need = replay(actions, COSTS, 4)
    assert need.in_flight == 2
    # 40 posted; F0 F1: 250; B0 (peak 310): 190; F2: 295; B1 (325): 195; F3: 300; B2 peaks 300 + 30
    assert need.peak == 330
    live_at_end = 40 + 4 * 105 - 60 - 3 * 100
    large = replace(COSTS, gradients=400)        # the flat buffer of the replicas' mean, after the last backward
    assert replay(actions, large, 4, replicas=2).peak == live_at_end + 400
    assert replay(actions, large, 4, replicas=1).peak == 330


def test_measuring_a_stage_leaves_no_trace():
    """The random generators (dropout), the gradients and the buffers are as before: training draws what it would
    draw without the measurement."""
    dt.manual_seed(0)
    model = TransformerLanguageModel(20, d_model=16, heads=2, layers=2, max_len=8, dropout=0.5)
    model.train()
    cut = partition(model, None, 2, split_points=["blocks.1"])
    tokens = np.random.default_rng(0).integers(0, 20, size=(9, 4))
    before, buffers = dt.get_rng_state(), {n: b.numpy().copy() for n, b in model.named_buffers()}
    loss_fn = lambda output, y: protocol.output_loss(model, output, dt.tensor(y))  # noqa: E731
    for k in (0, 1):
        need = stage_step_bytes(model, cut, k, tokens[:-1], tokens[1:], loss_fn, "1f1b", 2)
        assert need.peak > 0 and need.in_flight == 2 - k
    assert repr(dt.get_rng_state()) == repr(before)
    assert all(p.grad is None for p in model.parameters())
    for name, b in model.named_buffers():
        np.testing.assert_array_equal(b.numpy(), buffers[name])


def test_a_cut_after_a_block_returning_a_tuple_is_refused_naming_the_block():
    model = nn.Sequential(nn.Linear(4, 6), Pair(), Sum(), nn.Linear(6, 3))
    cut = partition(model, None, 2, split_points=["2"])
    x, y = np.ones((4, 4), dtype=np.float32), np.zeros(4, dtype=np.int64)
    loss_fn = lambda output, targets: protocol.output_loss(model, output, dt.tensor(targets))  # noqa: E731
    for k in (0, 1):                                  # both ranks either side of the cut meet it
        with pytest.raises(CutError, match="block '1' returns a tuple and ends a pipeline stage, but stages exchange "
                                           "one Tensor"):
            stage_step_bytes(model, cut, k, x, y, loss_fn, "1f1b", 2, batch_axis=0)


def test_a_frozen_first_stage_is_measured_without_a_backward_and_its_successor_sends_no_gradient():
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    model[0].weight.requires_grad_(False)
    model[0].bias.requires_grad_(False)
    cut = partition(model, None, 2, split_points=["2"])
    assert not cut.input_needs_gradient(model, 1)
    x, y = np.ones((4, 4), dtype=np.float32), np.zeros(4, dtype=np.int64)
    loss_fn = lambda output, targets: protocol.output_loss(model, output, dt.tensor(targets))  # noqa: E731
    first = stage_step_bytes(model, cut, 0, x, y, loss_fn, "1f1b", 2, batch_axis=0)
    last = stage_step_bytes(model, cut, 1, x, y, loss_fn, "1f1b", 2, batch_axis=0)
    assert first.peak > 0 and last.peak > 0
    assert all(p.grad is None for p in model.parameters())
