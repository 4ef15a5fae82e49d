"""The generators' states on a non-CPU backend, checked on the CPU with a stand-in backend: named
"cuda", NumPy arrays, the reference kernels. Its generator is the CounterGenerator the GPU gets, so
saving, restoring, forking and pending states are the GPU's logic; tests/gpu repeats the key ones on
a real GPU."""
import json
import types

import numpy as np
import pytest

import disttrain as dt
from disttrain.autograd.ops import nn as nn_ops
from disttrain.checkpointing import checkpoint
from disttrain.nn import functional as F
from disttrain.tensor import kernels_numpy, random

STAND_IN = types.SimpleNamespace(name="cuda", xp=np, kernels=kernels_numpy)


def _draw(n=6, dtype=np.float64):
    return random.generator(STAND_IN).random((n,), dtype=dtype)


def test_the_device_generator_is_counter_based_and_seeded_by_manual_seed():
    dt.manual_seed(11)
    gen = random.generator(STAND_IN)
    assert isinstance(gen, random.CounterGenerator) and gen.state == {"seed": 11, "offset": 0}
    first = np.concatenate([_draw(4), _draw(3, np.float32)])
    assert gen.state == {"seed": 11, "offset": 7}
    np.testing.assert_array_equal(first[:4], kernels_numpy.counter_uniform(np, (4,), np.float64, 11, 0))
    np.testing.assert_array_equal(first[4:], kernels_numpy.counter_uniform(np, (3,), np.float32, 11, 4))
    dt.manual_seed(11)
    np.testing.assert_array_equal(_draw(4), first[:4])
    dt.manual_seed(12)
    assert not np.array_equal(_draw(4), first[:4])


def test_get_and_set_rng_state_round_trip_the_device_stream_through_json():
    dt.manual_seed(3)
    _draw(5)
    dt.randn(2)  # the CPU generator is live too
    state = json.loads(json.dumps(dt.get_rng_state()))  # as a job checkpoint stores it
    assert state["cuda"] == {"seed": 3, "offset": 5} and "cpu" in state
    expected_device, expected_cpu = _draw(), dt.randn(3).numpy()
    _draw(100)
    dt.manual_seed(99)
    dt.set_rng_state(state)
    np.testing.assert_array_equal(_draw(), expected_device)
    np.testing.assert_array_equal(dt.randn(3).numpy(), expected_cpu)


def test_fork_rng_replays_the_device_stream_and_leaves_the_live_one_where_it_was():
    dt.manual_seed(5)
    _draw(3)
    state = dt.get_rng_state()
    first = _draw()
    live = random.generator(STAND_IN)
    with random.fork_rng(state):
        np.testing.assert_array_equal(_draw(), first)  # the device stream replays from the snapshot
        _draw(50)
    assert random.generator(STAND_IN) is live and live.state == {"seed": 5, "offset": 9}
    np.testing.assert_array_equal(_draw(), kernels_numpy.counter_uniform(np, (6,), np.float64, 5, 9))


def test_a_restored_state_waits_for_the_generator_to_be_created():
    dt.manual_seed(8)
    _draw(4)
    state = dt.get_rng_state()
    expected = _draw()
    dt.manual_seed(0)
    dt.set_rng_state(state)
    assert "cuda" not in random._generators  # pending, by name
    assert dt.get_rng_state()["cuda"] == {"seed": 8, "offset": 4}  # carried by a snapshot meanwhile
    np.testing.assert_array_equal(_draw(), expected)  # applied on first use
    assert random.generator(STAND_IN).state == {"seed": 8, "offset": 10}
    dt.manual_seed(8)
    assert random.generator(STAND_IN).state == {"seed": 8, "offset": 0}  # manual_seed drops pending states


def test_an_old_checkpoint_state_without_device_entries_still_loads():
    dt.manual_seed(4)
    dt.randn(2)
    old = {"seed": 4, "cpu": dt.get_rng_state()["cpu"]}  # what job checkpoints held before
    expected_cpu = dt.randn(3).numpy()
    dt.manual_seed(0)
    _draw(7)
    dt.set_rng_state(old)
    np.testing.assert_array_equal(dt.randn(3).numpy(), expected_cpu)
    np.testing.assert_array_equal(_draw(), kernels_numpy.counter_uniform(np, (6,), np.float64, 4, 0))


@pytest.mark.parametrize("bad", [{"seed": 1}, {"seed": 1, "offset": -1}, {"seed": 1, "offset": 2.5}, [1, 2]])
def test_a_bad_device_state_is_refused_by_name(bad):
    with pytest.raises(ValueError, match="backend 'cuda'"):
        dt.set_rng_state({"seed": 1, "cuda": bad})
    with pytest.raises(ValueError, match="snapshot"):
        dt.set_rng_state({"cuda": {"seed": 1, "offset": 0}})


def test_a_refused_state_changes_nothing():
    dt.manual_seed(6)
    _draw(2)
    before = dt.get_rng_state()
    with pytest.raises(ValueError):
        with random.fork_rng({"seed": 1, "cpu": {"bit_generator": "MT19937"}}):
            pass
    with pytest.raises(ValueError):
        dt.set_rng_state({"seed": 1, "cpu": {"bit_generator": "MT19937"}})
    assert dt.get_rng_state() == before


# ---- dropout in a checkpointed segment draws on the stand-in's generator ----------------------------

@pytest.fixture
def dropout_on_stand_in(monkeypatch):
    """Dropout's masks come from the stand-in's generator (its arrays stay NumPy ones)."""
    monkeypatch.setattr(nn_ops, "generator", lambda backend: random.generator(STAND_IN))


def _segment(x, w):
    return F.dropout(dt.tanh(x @ w), p=0.5)


def _grads(run, x, w):
    """Gradients of sum(dropout(run(x, w))^2) and a draw after backward, from seed 2."""
    x.grad = w.grad = None
    dt.manual_seed(2)
    _draw(3)  # the segment does not start at the seed's first number: a restart from the seed would show
    out = F.dropout(run(x, w), p=0.3)
    (out * out).sum().backward()
    return x.grad.numpy().copy(), w.grad.numpy().copy(), _draw()


def test_checkpointed_dropout_replays_the_device_masks(dropout_on_stand_in):
    rng = np.random.default_rng(0)
    x = dt.tensor(rng.standard_normal((4, 5)), requires_grad=True)
    w = dt.tensor(rng.standard_normal((5, 6)), requires_grad=True)
    plain = _grads(_segment, x, w)
    replayed = _grads(lambda a, b: checkpoint(_segment, a, b), x, w)
    for got, expected in zip(replayed, plain):  # same gradients, and the stream continues where it was
        np.testing.assert_array_equal(got, expected)
    assert random.generator(STAND_IN).state["offset"] == 3 + 4 * 6 * 2 + 6  # the masks came from the stand-in
    fresh = _grads(lambda a, b: checkpoint(_segment, a, b, preserve_rng_state=False), x, w)
    assert not np.array_equal(fresh[1], plain[1])  # without the replay, the recomputed mask differs


def test_step_streams_differ_by_stream_and_leave_the_shared_generators_one_draw_on():
    dt.manual_seed(4)
    draws = []
    for stream in (0, 1, 0):
        state = dt.get_rng_state()
        with random.step_stream(stream):
            draws.append(dt.rand(5).numpy())
            inner = dt.rand(1000)                       # however much the step draws ...
        after = dt.rand(3).numpy()
        dt.set_rng_state(state)
        with random.step_stream(stream):
            pass
        np.testing.assert_array_equal(dt.rand(3).numpy(), after)   # ... the shared stream moved by one draw
        dt.set_rng_state(state)
        with random.step_stream(stream):
            np.testing.assert_array_equal(dt.rand(5).numpy(), draws[-1])   # and the step's numbers repeat
        del inner
    assert not np.array_equal(draws[0], draws[1])
