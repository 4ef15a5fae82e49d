"""checkpoint / checkpoint_sequential: gradients equal those of the plain run, parameters inside
segments get theirs exactly once, RNG replay, nesting, odd arguments and outputs, errors."""
import numpy as np
import pytest

import disttrain as dt
from disttrain import nn
from disttrain.checkpointing import checkpoint, checkpoint_sequential, segment_bounds


def mlp(depth, width, dtype="float64", dropout=0.0):
    dt.manual_seed(0)
    blocks = []
    for _ in range(depth):
        blocks += [nn.Linear(width, width, dtype=dtype), nn.Tanh()]
        if dropout:
            blocks.append(nn.Dropout(dropout))
    return nn.Sequential(*blocks)


def grads_of(model, run, x, seed=1):
    """Gradients of sum(run(x)**2) w.r.t. the parameters and x, with the generators reset to `seed`."""
    model.zero_grad()
    x.grad = None
    dt.manual_seed(seed)
    out = run(x)
    (out * out).sum().backward()
    return [p.grad.numpy().copy() for p in model.parameters()] + [x.grad.numpy().copy()], out.numpy().copy()


def max_diff(a, b):
    return max(float(np.abs(u - v).max()) for u, v in zip(a, b))


@pytest.mark.parametrize("segments", ["sqrt", 1, 3, 5, 12, 100])
def test_checkpoint_sequential_float64_gradients_equal_plain(segments):
    model = mlp(12, 16, dropout=0.2)
    x = dt.randn(8, 16, dtype="float64", requires_grad=True)
    plain, out_plain = grads_of(model, model, x)
    ckpt, out_ckpt = grads_of(model, lambda v: checkpoint_sequential(model, segments, v), x)
    assert max_diff(plain, ckpt) <= 1e-12  # dropout masks replayed: same numbers, same order of ops
    np.testing.assert_array_equal(out_plain, out_ckpt)


def test_checkpoint_sequential_float32_and_module_list():
    model = mlp(9, 32, dtype="float32")
    x = dt.randn(4, 32, requires_grad=True)
    plain, _ = grads_of(model, model, x)
    ckpt, _ = grads_of(model, lambda v: checkpoint_sequential(list(model), 3, v), x)
    for a, b in zip(plain, ckpt):
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7)


def test_input_without_grad_still_gives_parameter_gradients_once_and_hooks_fire_once():
    model = mlp(16, 8)
    x = dt.randn(4, 8, dtype="float64")  # the first segment's input does not require grad
    fired = {}
    for p in model.parameters():
        p.register_post_accumulate_grad_hook(lambda t: fired.__setitem__(id(t), fired.get(id(t), 0) + 1))
    model.zero_grad()
    checkpoint_sequential(model, "sqrt", x).sum().backward()
    ckpt = [p.grad.numpy().copy() for p in model.parameters()]
    assert all(fired[id(p)] == 1 for p in model.parameters())  # one final gradient per parameter
    model.zero_grad()
    model(x).sum().backward()
    assert max_diff([p.grad.numpy() for p in model.parameters()], ckpt) <= 1e-12  # not doubled


def test_shared_parameter_across_segments_accumulates_the_sum_and_fires_once():
    dt.manual_seed(0)
    layer = nn.Linear(6, 6, dtype="float64")
    chain = nn.Sequential(*[layer, nn.Tanh()] * 4)  # the same weights in every segment
    x = dt.randn(3, 6, dtype="float64")
    fired = []
    layer.weight.register_post_accumulate_grad_hook(lambda t: fired.append(t.grad.numpy().copy()))
    checkpoint_sequential(chain, 4, x).sum().backward()
    ckpt = layer.weight.grad.numpy().copy()
    layer.zero_grad()
    chain(x).sum().backward()
    assert len(fired) == 2  # one per backward pass, the second one plain
    np.testing.assert_allclose(fired[0], ckpt)
    assert np.abs(layer.weight.grad.numpy() - ckpt).max() <= 1e-12


def test_closure_over_parameters_accumulates_them_and_fires_their_hooks():
    dt.manual_seed(0)
    w = dt.randn(5, 5, dtype="float64", requires_grad=True)
    x = dt.randn(2, 5, dtype="float64", requires_grad=True)
    fired = []
    w.register_post_accumulate_grad_hook(lambda t: fired.append(1))
    checkpoint(lambda v: (v @ w).tanh(), x).sum().backward()
    ckpt_w, ckpt_x = w.grad.numpy().copy(), x.grad.numpy().copy()
    assert fired == [1]
    w.grad = x.grad = None
    (x @ w).tanh().sum().backward()
    np.testing.assert_array_equal(w.grad.numpy(), ckpt_w)
    np.testing.assert_array_equal(x.grad.numpy(), ckpt_x)


def test_nested_checkpoints():
    model = mlp(8, 8, dropout=0.1)
    blocks = [model[3 * i:3 * i + 3] for i in range(8)]

    def outer(v):
        v = checkpoint(blocks[0], v)
        v = checkpoint(lambda u: blocks[2](checkpoint(blocks[1], u)), v)
        return blocks[3](v)

    def run(v):
        v = checkpoint(outer, v)
        v = checkpoint(lambda u: checkpoint_sequential(blocks[4:7], 2, u), v)
        return blocks[7](v)

    x = dt.randn(3, 8, dtype="float64", requires_grad=True)
    plain, out_plain = grads_of(model, model, x)
    ckpt, out_ckpt = grads_of(model, run, x)
    np.testing.assert_array_equal(out_plain, out_ckpt)
    assert max_diff(plain, ckpt) <= 1e-12


def test_non_tensor_arguments_and_several_outputs():
    dt.manual_seed(0)
    a = dt.randn(3, 4, dtype="float64", requires_grad=True)
    b = dt.randn(3, 4, dtype="float64", requires_grad=True)
    idx = dt.tensor([2, 0, 1])

    def fn(x, scale, y, index, options):
        s = (x * y).sum(axis=1)
        return x * scale + y, s.exp(), index, options["tag"], (x > 0)

    def loss(outs):
        return (outs[0] * outs[0]).sum() + outs[1][outs[2]].sum()

    outs = checkpoint(fn, a, 2.5, b, idx, {"tag": "t"})
    assert isinstance(outs, tuple) and len(outs) == 5
    assert outs[0].requires_grad and outs[1].requires_grad
    assert outs[2] is idx and outs[3] == "t" and not outs[4].requires_grad and outs[4].dtype == dt.bool_
    loss(outs).backward()
    ckpt = a.grad.numpy().copy(), b.grad.numpy().copy()
    a.grad = b.grad = None
    loss(fn(a, 2.5, b, idx, {"tag": "t"})).backward()
    np.testing.assert_array_equal(a.grad.numpy(), ckpt[0])
    np.testing.assert_array_equal(b.grad.numpy(), ckpt[1])


def test_unused_output_gets_zero_gradient_and_only_some_inputs_require_grad():
    dt.manual_seed(0)
    a = dt.randn(4, dtype="float64", requires_grad=True)
    c = dt.randn(4, dtype="float64")
    first, second = checkpoint(lambda x, y: (x * y, x.exp()), a, c)
    first.sum().backward()  # `second` receives no gradient
    np.testing.assert_array_equal(a.grad.numpy(), c.numpy())


def test_under_no_grad_it_just_calls_fn():
    model = mlp(4, 4)
    x = dt.randn(2, 4, dtype="float64", requires_grad=True)
    with dt.no_grad():
        out = checkpoint(model, x)
        seq = checkpoint_sequential(model, 2, x)
    assert not out.requires_grad and out.grad_fn is None and not seq.requires_grad
    np.testing.assert_array_equal(out.numpy(), model(x).numpy())


def test_frozen_module_and_plain_input_record_nothing():
    model = mlp(3, 4).requires_grad_(False)
    out = checkpoint(model, dt.randn(2, 4, dtype="float64"))
    assert not out.requires_grad


def test_grad_through_checkpoint_and_retain_graph():
    model = mlp(4, 5)
    x = dt.randn(2, 5, dtype="float64", requires_grad=True)
    (gx,) = dt.grad((model(x) ** 2).sum(), x)
    y = checkpoint(model, x)
    (gx_ckpt,) = dt.grad((y ** 2).sum(), x, retain_graph=True)
    np.testing.assert_array_equal(gx_ckpt.numpy(), gx.numpy())
    (y ** 2).sum().backward(retain_graph=True)  # the checkpoint node was kept: recompute again
    np.testing.assert_array_equal(x.grad.numpy(), gx.numpy())
    (y ** 2).sum().backward()
    with pytest.raises(RuntimeError, match="retain_graph=True"):
        (y ** 2).sum().backward()


def test_input_changed_in_place_before_backward_is_an_error():
    model = mlp(2, 3)
    x = dt.randn(2, 3, dtype="float64")
    y = checkpoint(model, x)
    x.add_(1.0)
    with pytest.raises(RuntimeError, match="modified in place"):
        y.sum().backward()


def test_closure_over_a_graph_tensor_asks_for_it_as_an_argument():
    w = dt.randn(3, dtype="float64", requires_grad=True)
    scaled = w * 2.0
    y = checkpoint(lambda v: v * scaled, dt.randn(3, dtype="float64", requires_grad=True))
    with pytest.raises(RuntimeError, match="pass that tensor as an argument"):
        y.sum().backward()


def test_create_graph_is_refused():
    x = dt.randn(3, dtype="float64", requires_grad=True)
    y = checkpoint(lambda v: v.tanh(), x)
    with pytest.raises(RuntimeError, match="create_graph"):
        dt.grad(y.sum(), [x], create_graph=True)


def test_rng_is_replayed_and_the_stream_continues_as_without_checkpointing():
    model = mlp(6, 8, dropout=0.5)
    x = dt.randn(4, 8, dtype="float64")
    draws = []
    for run in (model, lambda v: checkpoint_sequential(model, 3, v)):
        dt.manual_seed(7)
        run(x).sum().backward()
        draws.append(dt.rand(3).numpy())
    np.testing.assert_array_equal(draws[0], draws[1])


def test_without_rng_replay_dropout_masks_differ():
    model = mlp(6, 8, dropout=0.5)
    x = dt.randn(4, 8, dtype="float64", requires_grad=True)
    plain, _ = grads_of(model, model, x)
    other, _ = grads_of(model, lambda v: checkpoint_sequential(model, 3, v, preserve_rng_state=False), x)
    assert max_diff(plain, other) > 1e-3


def test_segment_bounds():
    assert segment_bounds(64, "sqrt") == [0, 8, 16, 24, 32, 40, 48, 56, 64]
    assert segment_bounds(10, 3) == [0, 3, 6, 10]
    assert segment_bounds(3, 10) == [0, 1, 2, 3]
    for bad in (0, -1, "half", 2.0, True):
        with pytest.raises(ValueError, match="segments"):
            segment_bounds(10, bad)


def test_closure_over_parameters_with_no_input_requiring_grad_still_gives_their_gradients():
    dt.manual_seed(0)
    w = dt.randn(4, 4, dtype="float64", requires_grad=True)
    x = dt.randn(2, 4, dtype="float64")  # neither the argument nor any known parameter requires grad
    y = checkpoint(lambda v: (v @ w).tanh(), x)
    assert y.requires_grad
    y.sum().backward()
    ckpt = w.grad.numpy().copy()
    w.grad = None
    (x @ w).tanh().sum().backward()
    np.testing.assert_array_equal(w.grad.numpy(), ckpt)


def test_the_checkpoint_node_is_an_op_that_observers_and_the_memory_meter_see():
    from disttrain.autograd import observe_ops
    from disttrain.checkpointing import MemoryMeter

    model = mlp(2, 64)
    x = dt.randn(32, 64, dtype="float64", requires_grad=True)
    calls = []
    with observe_ops(calls.append):
        y = checkpoint(model, x)
    outer = [c for c in calls if c.depth == 0]
    assert [c.op.__name__ for c in outer] == ["Checkpoint"] and outer[0].node is y.grad_fn
    assert outer[0].outputs == (y,) and {c.op.__name__ for c in calls if c.depth == 1} >= {"Linear", "Tanh"}
    with MemoryMeter() as meter:  # a checkpointed call keeps only its output: no activations inside
        y = checkpoint(model, x)
        kept = meter.live_bytes - meter.start_bytes
    assert kept == 32 * 64 * 8


def test_array_and_tensor_arguments_side_by_side():
    dt.manual_seed(0)
    x = dt.randn(3, 4, dtype="float64", requires_grad=True)
    offsets = np.arange(12.0).reshape(3, 4)  # a plain array argument: compared by identity, never with ==
    y = checkpoint(lambda v, a: v * dt.tensor(a), x, offsets)
    y.sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), offsets)
