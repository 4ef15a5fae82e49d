"""Tensor and autograd calls that a PyTorch user writes from habit give torch's results (PyTorch as the oracle):
transpose(dim0, dim1), in-place operators, grad()'s tuple, max/min along a dim with indices, the unbiased
var/std, index tensors changed before backward, pow's gradient at zero, iteration and Python conversions,
torch's keyword names, and the edge cases of clip_grad_norm_ and cross_entropy."""
import numpy as np
import pytest

import disttrain as dt
from disttrain.autograd import gradcheck
from disttrain.nn import functional as F
from disttrain.nn.utils import clip_grad_norm_

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch

RNG = np.random.default_rng(0)
X = RNG.standard_normal((3, 4))
X3 = RNG.standard_normal((2, 3, 4))


def ours(a, requires_grad=False):
    return dt.tensor(np.asarray(a), dtype="float64", requires_grad=requires_grad)


def theirs(a, requires_grad=False):
    return torch.tensor(np.asarray(a), dtype=torch.float64, requires_grad=requires_grad)


def same(a, b):
    a = a.numpy() if isinstance(a, dt.Tensor) else np.asarray(a)
    b = b.detach().numpy() if isinstance(b, torch.Tensor) else np.asarray(b)
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)


# ---- transpose swaps two axes; permute reorders all ---------------------------------------------
@pytest.mark.parametrize("a, dims", [(X, (0, 1)), (X, (-2, -1)), (X, (1, 0)), (X3, (0, 2)), (X3, (-1, 1)),
                                     (X3, (1, 1))], ids=str)
def test_transpose_swaps_two_axes_as_torch(a, dims):
    x, t = ours(a, True), theirs(a, True)
    w = RNG.standard_normal(np.swapaxes(a, *dims).shape)
    (x.transpose(*dims) * ours(w)).sum().backward()
    (t.transpose(*dims) * theirs(w)).sum().backward()
    same(x.transpose(*dims), t.transpose(*dims))
    same(x.grad, t.grad)
    same(x.swapaxes(*dims), t.swapaxes(*dims))
    same(dt.transpose(x, *dims), torch.transpose(t, *dims))


def test_square_attention_scores_use_the_transposed_key():
    q, k = RNG.standard_normal((3, 3)), RNG.standard_normal((3, 3))
    same(ours(q) @ ours(k).transpose(-2, -1), theirs(q) @ theirs(k).transpose(-2, -1))


def test_permute_and_T_keep_the_full_permutation():
    x, t = ours(X3), theirs(X3)
    same(x.permute(2, 0, 1), t.permute(2, 0, 1))
    same(x.permute((1, 2, 0)), t.permute((1, 2, 0)))
    same(dt.permute(x, (2, 1, 0)), torch.permute(t, (2, 1, 0)))
    same(ours(X).T, theirs(X).T)


def test_transpose_with_a_permutation_says_to_use_permute():
    with pytest.raises(TypeError, match="permute"):
        ours(X3).transpose(2, 0, 1)
    with pytest.raises(TypeError, match="permute"):
        ours(X3).transpose((2, 0, 1))


# ---- in-place operators ---------------------------------------------------------------------------
def test_manual_sgd_with_augmented_assignment_updates_the_parameters():
    torch_model = torch.nn.Linear(3, 2).double()
    model = dt.nn.Linear(3, 2)
    model.load_state_dict({k: v.detach().numpy() for k, v in torch_model.state_dict().items()})
    model.to(dtype="float64")
    x = RNG.standard_normal((4, 3))
    for m, tensor, no_grad in ((model, ours, dt.no_grad), (torch_model, theirs, torch.no_grad)):
        held = list(m.parameters())
        for _ in range(2):
            ((m(tensor(x)) ** 2).mean()).backward()
            with no_grad():
                for p in m.parameters():
                    p -= 0.1 * p.grad
                    p.grad *= 0.0
                    p += 0.5 * p.grad
                    p *= 1.01
                    p /= 1.02
        assert all(a is b for a, b in zip(held, m.parameters()))
    for (name, p), (_, q) in zip(model.named_parameters(), torch_model.named_parameters()):
        same(p, q)


def test_augmented_assignment_changes_aliases_and_counts_a_version():
    a = dt.ones(3)
    alias, view = a, a[1:]
    before = a.version
    a += 1
    a -= dt.tensor([0.5, 0.5, 0.5])
    assert a is alias and alias.tolist() == [1.5, 1.5, 1.5] and view.tolist() == [1.5, 1.5]
    assert a.version == before + 2


def test_augmented_assignment_on_a_leaf_that_requires_grad_is_refused_in_grad_mode():
    w = ours([1.0, 2.0], True)
    with pytest.raises(RuntimeError, match="leaf tensor that requires grad"):
        w += 1.0
    with pytest.raises(RuntimeError):
        theirs([1.0, 2.0], True).add_(1.0)


def test_augmented_assignment_inside_a_graph_gives_torch_gradients():
    x, t = ours(X, True), theirs(X, True)
    for v in (x, t):
        loss = (v * v).sum()
        loss += (v * 3.0).sum()   # torch records it in place; disttrain rebinds, same values and gradient
        h = v * 1.0
        h *= v
        (loss + h.sum()).backward()
    same(x.grad, t.grad)


# ---- grad() returns a tuple ---------------------------------------------------------------------
def test_grad_of_a_single_input_is_a_one_tuple():
    x, t = ours(X, True), theirs(X, True)
    got = dt.grad((x * x).sum(), x)
    expected = torch.autograd.grad((t * t).sum(), t)
    assert isinstance(got, tuple) and len(got) == len(expected) == 1
    same(got[0], expected[0])


# ---- max / min along a dim: (values, indices) --------------------------------------------------
@pytest.mark.parametrize("name", ["max", "min"])
@pytest.mark.parametrize("dim", [0, 1, -1])
@pytest.mark.parametrize("keepdim", [False, True])
def test_max_min_along_a_dim_give_values_and_indices(name, dim, keepdim):
    a = np.array([[0.1, 2.0, 2.0, -1.0], [3.0, 3.0, 0.2, -1.0], [0.5, -4.0, 0.5, 7.0]])  # with ties
    x, t = ours(a, True), theirs(a, True)
    got, expected = getattr(x, name)(dim, keepdim=keepdim), getattr(t, name)(dim, keepdim=keepdim)
    values, indices = got
    assert type(got).__name__ == name and got.values is values and got.indices is indices
    same(values, expected.values)
    assert indices.dtype == np.int64 and indices.tolist() == expected.indices.tolist()
    assert got[1].tolist() == expected[1].tolist()
    values.sum().backward()
    expected.values.sum().backward()
    same(x.grad, t.grad)  # to the element the index names, not shared among ties


def test_max_min_without_a_dim_and_of_two_tensors():
    x, t = ours(X), theirs(X)
    same(x.max(), t.max())
    same(x.min(), t.min())
    same(x.max(dim=1).values, t.max(dim=1).values)
    a, b = RNG.standard_normal((3, 4)), RNG.standard_normal(4)
    same(dt.max(ours(a), ours(b)), torch.max(theirs(a), theirs(b)))
    same(dt.min(ours(a), ours(b)), torch.min(theirs(a), theirs(b)))
    same(ours(a).max(ours(b)), theirs(a).max(theirs(b)))


def test_argmax_idiom_and_unpacking():
    logits = RNG.standard_normal((5, 3))
    _, predicted = ours(logits).max(1)
    assert predicted.tolist() == torch.tensor(logits).max(1)[1].tolist() == ours(logits).max(1)[1].tolist()


# ---- var and std: unbiased by default ----------------------------------------------------------
@pytest.mark.parametrize("name", ["var", "std"])
@pytest.mark.parametrize("kwargs", [{}, {"dim": 1}, {"dim": (0, 2), "keepdim": True}, {"correction": 0},
                                    {"dim": 2, "correction": 2}, {"dim": -1, "unbiased": False},
                                    {"unbiased": True}], ids=str)
def test_var_std_as_torch(name, kwargs):
    x, t = ours(X3, True), theirs(X3, True)
    got, expected = getattr(x, name)(**kwargs), getattr(t, name)(**kwargs)
    same(got, expected)
    got.sum().backward()
    expected.sum().backward()
    same(x.grad, t.grad)


def test_var_positional_keepdims_is_refused_not_taken_for_unbiased():
    with pytest.raises(TypeError):
        ours(X).var(1, True)  # torch's old var(dim, unbiased): refused rather than read as keepdims


# ---- an index tensor changed in place after forward ----------------------------------------------
def _gradient_after_refilling_the_index(lookup):
    weight = ours(np.arange(12.0).reshape(4, 3), True)
    ids = dt.tensor([0, 1])
    out = lookup(weight, ids)
    ids[0] = 3  # a reused batch buffer refilled before backward
    out.sum().backward()
    return weight.grad


@pytest.mark.parametrize("lookup", [lambda w, ids: w[ids], lambda w, ids: F.embedding(ids, w)],
                         ids=["getitem", "embedding"])
def test_gradient_goes_to_the_rows_picked_at_forward(lookup):
    t = theirs(np.arange(12.0).reshape(4, 3), True)
    t[torch.tensor([0, 1])].sum().backward()  # torch refuses the refill; its gradient without one
    same(_gradient_after_refilling_the_index(lookup), t.grad)


# ---- pow's gradient where the formula gives 0 * inf ---------------------------------------------
def test_pow_gradient_at_zero_as_torch():
    base, exponent = [0.0, 0.0, 0.0, 2.0, -2.0, 0.0], [2.0, 0.0, -1.0, 0.5, 2.0, 1.0]
    cases = [(lambda a, b: a ** 0.0, True, False), (lambda a, b: a ** b, True, True),
             (lambda a, b: 0.0 ** b, False, True)]
    for f, wrt_base, wrt_exponent in cases:
        a, b = ours(base, wrt_base), ours(exponent, wrt_exponent)
        ta, tb = theirs(base, wrt_base), theirs(exponent, wrt_exponent)
        with np.errstate(divide="ignore", invalid="ignore"):
            f(a, b).sum().backward()
        f(ta, tb).sum().backward()
        for ours_leaf, their_leaf in ((a, ta), (b, tb)):
            if ours_leaf.requires_grad:
                same(ours_leaf.grad, their_leaf.grad)


@pytest.mark.filterwarnings("ignore:divide by zero", "ignore:invalid value")
def test_pow_gradcheck_at_zero():
    zeros_and_more = ours([0.0, 0.0, 1.5], True)
    assert gradcheck(lambda a: a ** 0.0, [zeros_and_more])
    assert gradcheck(lambda y: ours([0.0, 0.0, 1.5]) ** y, [ours([2.0, 1.5, 0.5], True)])
    assert gradcheck(lambda a: a ** ours([0.0, 2.0, 0.0]), [zeros_and_more])
    assert gradcheck(lambda a, y: a ** y, [zeros_and_more, ours([1.0, 2.0, 2.0], True)])


# ---- iteration and Python conversions ------------------------------------------------------------
def test_iteration_over_the_first_axis():
    x, t = ours(X, True), theirs(X, True)
    assert [r.tolist() for r in x] == [r.tolist() for r in t]
    first, second, third = x
    same(second, t[1])
    same(sum(x), sum(t))
    assert np.asarray(x).shape == X.shape and np.asarray(x).dtype == X.dtype   # not an array of objects
    sum(r * float(i + 1) for i, r in enumerate(x)).sum().backward()
    sum(r * float(i + 1) for i, r in enumerate(t)).sum().backward()
    same(x.grad, t.grad)
    with pytest.raises(TypeError, match="iteration over a 0-d tensor"):
        iter(dt.tensor(1.0))
    with pytest.raises(TypeError, match="iteration over a 0-d tensor"):
        iter(torch.tensor(1.0))


def test_python_scalar_conversions():
    assert float(ours([2.5])) == float(theirs([2.5])) == 2.5
    assert int(ours(-2.7)) == int(theirs(-2.7)) == -2
    assert [10, 20, 30][dt.tensor(1)] == [10, 20, 30][torch.tensor(1)] == 20
    assert list(range(dt.tensor([3]))) == [0, 1, 2]
    with pytest.raises(TypeError):
        [1, 2][dt.tensor(1.0)]
    with pytest.raises(TypeError):
        float(ours([1.0, 2.0]))
    assert bool(dt.tensor([0.0])) is bool(torch.tensor([0.0])) is False
    same(abs(ours([-1.0, 2.0])), abs(theirs([-1.0, 2.0])))


# ---- torch's keyword names -----------------------------------------------------------------------
def test_torch_keyword_names():
    x, t = ours(X3), theirs(X3)
    same(x.sum(dim=1, keepdim=True), t.sum(dim=1, keepdim=True))
    same(x.mean(dim=(0, 2)), t.mean(dim=(0, 2)))
    same(x.max(dim=2, keepdim=True).values, t.max(dim=2, keepdim=True).values)
    same(x.min(dim=0).indices, t.min(dim=0).indices)
    assert x.argmax(dim=1).tolist() == t.argmax(dim=1).tolist()
    assert x.argmax(dim=1, keepdim=True).tolist() == t.argmax(dim=1, keepdim=True).tolist()
    same(dt.sum(x, dim=-1), torch.sum(t, dim=-1))
    same(dt.cat([x, x], dim=1), torch.cat([t, t], dim=1))
    same(dt.concat([x, x], dim=-1), torch.cat([t, t], dim=-1))
    same(dt.stack([x, x], dim=2), torch.stack([t, t], dim=2))
    with pytest.raises(TypeError, match="both axis=1 and dim=2"):
        x.sum(1, dim=2)


def test_squeeze_without_an_axis_and_flatten_with_an_end():
    a = np.zeros((1, 3, 1, 2))
    assert ours(a).squeeze().shape == tuple(theirs(a).squeeze().shape) == (3, 2)
    for args in [(), (1,), (1, 2), (0, -2), (-3, -1), (2, 2)]:
        assert ours(a).flatten(*args).shape == tuple(theirs(a).flatten(*args).shape), args
    assert ours(a).flatten(start_dim=1, end_dim=2).shape == tuple(theirs(a).flatten(start_dim=1, end_dim=2).shape)


# ---- edge cases of clipping and the cross-entropy ----------------------------------------------
def test_clip_grad_norm_with_a_nan_norm_scales_every_gradient():
    p, q = dt.nn.Parameter(dt.zeros(2, dtype="float64")), dt.nn.Parameter(dt.zeros(2, dtype="float64"))
    tp, tq = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64)), torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    p.grad, tp.grad = ours([np.nan, 5.0]), theirs([np.nan, 5.0])
    q.grad, tq.grad = ours([1.0, 2.0]), theirs([1.0, 2.0])
    total = clip_grad_norm_([p, q], 1.0)
    expected = torch.nn.utils.clip_grad_norm_([tp, tq], 1.0)
    assert np.isnan(total) and torch.isnan(expected)
    np.testing.assert_array_equal(q.grad.numpy(), tq.grad.numpy())  # all NaN
    np.testing.assert_array_equal(p.grad.numpy(), tp.grad.numpy())


def test_cross_entropy_mean_with_every_target_ignored_is_nan():
    x, t = ours(X, True), theirs(X, True)
    loss = F.cross_entropy(x, dt.tensor([-100] * 3))
    expected = torch.nn.functional.cross_entropy(t, torch.tensor([-100] * 3))
    assert np.isnan(loss.item()) and torch.isnan(expected)
    loss.backward()
    expected.backward()
    same(x.grad, t.grad)  # zeros, as torch's
    same(F.cross_entropy(x, dt.tensor([-100, 1, -100])), torch.nn.functional.cross_entropy(t, torch.tensor([-100, 1, -100])))
