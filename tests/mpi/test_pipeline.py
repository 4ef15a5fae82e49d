"""Pipeline parallelism on 2+ ranks against one process on the same batch (run under mpiexec --with-mpi).

Every rank also computes the one-process reference itself (full model, full batch, same seed) and compares
its own stage's results with it after the pipeline step is done, so a failing assertion never leaves
another rank waiting. K = the world size (2 or 4 stages), and K = 2 on pairs of ranks when there are 4.
"""
import numpy as np
import pytest

import disttrain as dt
import disttrain.nn.functional as F
from disttrain import nn
from disttrain.models import LSTMLanguageModel
from disttrain.parallel import world
from disttrain.parallel.pipeline import Stage, blocks_of
from disttrain.parallel.pipeline.p2p import StageLink
from disttrain.parallel.pipeline.runtime import PipelineRuntime
from disttrain.tensor.memory import MemoryMeter

pytestmark = pytest.mark.mpi(min_size=2)

VOCAB, T, B = 11, 4, 8
TOL = {dt.float64: dict(rtol=1e-12, atol=1e-13), dt.float32: dict(rtol=2e-5, atol=1e-6)}


def pipes():
    """(pipe communicator, stages) for every layout this world allows: all ranks, and pairs of ranks."""
    comm = world()
    layouts = [(comm, comm.size)]
    if comm.size > 2 and comm.size % 2 == 0:
        layouts.append((comm.Split(color=comm.rank // 2), 2))
    return layouts


def equal_stage(model, stages, index):
    blocks = blocks_of(model)
    bounds = np.linspace(0, len(blocks), stages + 1).round().astype(int)
    return Stage(blocks[bounds[index]:bounds[index + 1]])


def mlp(dtype, width=6, depth=4):
    dt.manual_seed(3)
    layers = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(width, 3)).to(dtype=dtype)


def lstm_lm(dtype, layers=2):
    dt.manual_seed(5)
    return LSTMLanguageModel(VOCAB, hidden=7, layers=layers, embed=5).to(dtype=dtype)


def lm_loss(logits, targets):
    return F.cross_entropy(logits, dt.tensor(np.asarray(targets).reshape(-1)))


def mlp_loss(output, targets):
    return F.cross_entropy(output, dt.tensor(targets))


def grads_by_name(module):
    return {name: p.grad.numpy().copy() for name, p in module.named_parameters() if p.grad is not None}


def runtime_for(model, pipe, stages, schedule, micro, batch_axis, checkpointing=False):
    stage = equal_stage(model, stages, pipe.rank)
    return stage, PipelineRuntime(stage, StageLink(pipe.Dup(), pipe.rank, stages), schedule=schedule,
                                  micro_batches=micro, batch_axis=batch_axis, checkpointing=checkpointing)


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("dtype,micro", [(dt.float64, 4), (dt.float32, 2), (dt.float64, 1)])
def test_mlp_loss_and_gradients_equal_one_process(schedule, dtype, micro):
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((B, 6)).astype(dtype), rng.integers(0, 3, B)
    reference = mlp(dtype)
    ref_loss = mlp_loss(reference(dt.tensor(x)), y)
    ref_loss.backward()
    ref_grads = grads_by_name(reference)
    for pipe, stages in pipes():
        model = mlp(dtype)
        stage, runtime = runtime_for(model, pipe, stages, schedule, micro, batch_axis=0)
        result = runtime.step(x, y, mlp_loss)
        if pipe.rank == stages - 1:
            assert result.loss == pytest.approx(ref_loss.item(), rel=1e-12 if dtype == dt.float64 else 1e-5)
        mine = grads_by_name(stage)
        assert mine and set(mine) == {n for n, _ in stage.named_parameters()}
        for name, grad in mine.items():
            np.testing.assert_allclose(grad, ref_grads[name], **TOL[dtype], err_msg=name)


def reference_lm_segments(dtype, segments, sum_over_time=False):
    """One process over the segments with carried state: [(loss, {name: grad})] per segment."""
    model = lstm_lm(dtype)
    hidden, out = None, []
    for x, y in segments:
        logits, hidden = model(dt.tensor(x), hidden)
        loss = lm_loss(logits, y)
        model.zero_grad()
        (loss * T if sum_over_time else loss).backward()
        hidden = tuple(h.detach() for h in hidden)
        out.append((loss.item(), grads_by_name(model)))
    return out


def lm_segments(count=3):
    rng = np.random.default_rng(1)
    return [(rng.integers(0, VOCAB, (T, B)), rng.integers(0, VOCAB, (T, B))) for _ in range(count)]


@pytest.mark.parametrize("schedule,dtype,micro,checkpointing", [
    ("gpipe", dt.float64, 4, False), ("1f1b", dt.float64, 2, False), ("1f1b", dt.float32, 4, False),
    ("gpipe", dt.float64, 2, True)])
def test_lstm_lm_with_carried_state_over_segments_equals_one_process(schedule, dtype, micro, checkpointing):
    segments = lm_segments()
    reference = reference_lm_segments(dtype, segments, sum_over_time=True)
    for pipe, stages in pipes():
        model = lstm_lm(dtype)
        stage, runtime = runtime_for(model, pipe, stages, schedule, micro, batch_axis=1, checkpointing=checkpointing)
        states = None
        for (x, y), (ref_loss, ref_grads) in zip(segments, reference):
            stage.zero_grad()
            result = runtime.step(x, y, lm_loss, states, backward_scale=T)
            states = result.states
            if pipe.rank == stages - 1:
                assert result.loss == pytest.approx(ref_loss, rel=1e-12 if dtype == dt.float64 else 1e-5)
            for name, grad in grads_by_name(stage).items():
                np.testing.assert_allclose(grad, ref_grads[name], **TOL[dtype], err_msg=name)


def test_parameters_after_optimizer_steps_equal_one_process():
    segments = lm_segments(3)
    reference = lstm_lm(dt.float64)
    opt = dt.optim.Adam(reference.parameters(), lr=0.01)
    hidden = None
    for x, y in segments:
        logits, hidden = reference(dt.tensor(x), hidden)
        opt.zero_grad()
        lm_loss(logits, y).backward()
        opt.step()
        hidden = tuple(h.detach() for h in hidden)
    expected = {n: p.numpy() for n, p in reference.named_parameters()}
    for pipe, stages in pipes():
        model = lstm_lm(dt.float64)
        stage, runtime = runtime_for(model, pipe, stages, "1f1b", 2, batch_axis=1)
        opt = dt.optim.Adam(stage.parameters(), lr=0.01)
        states = None
        for x, y in segments:
            opt.zero_grad()
            states = runtime.step(x, y, lm_loss, states).states
            opt.step()
        for name, p in stage.named_parameters():
            np.testing.assert_allclose(p.numpy(), expected[name], rtol=1e-11, atol=1e-13, err_msg=name)


def test_forward_only_loss_equals_one_process():
    (x, y), = lm_segments(1)
    reference = lstm_lm(dt.float64)
    with dt.no_grad():
        expected = lm_loss(reference(dt.tensor(x))[0], y).item()
    for pipe, stages in pipes():
        _, runtime = runtime_for(lstm_lm(dt.float64), pipe, stages, "1f1b", 4, batch_axis=1)
        result = runtime.forward_only(x, y, lm_loss)
        if pipe.rank == stages - 1:
            assert result.loss == pytest.approx(expected, rel=1e-12)


def test_1f1b_holds_less_activation_memory_than_gpipe():
    comm = world()
    micro, width = 8, 64
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((micro * 16, width)), rng.integers(0, 3, micro * 16)
    peaks = {}
    for schedule in ("gpipe", "1f1b"):
        model = mlp(dt.float64, width=width, depth=comm.size * 2)
        _, runtime = runtime_for(model, comm, comm.size, schedule, micro, batch_axis=0)
        with MemoryMeter() as meter:
            runtime.step(x, y, mlp_loss)
        peaks[schedule] = meter.peak_bytes - meter.start_bytes
    assert peaks["1f1b"] < peaks["gpipe"], peaks
