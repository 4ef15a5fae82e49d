"""Shared helpers for the autograd tests: float64 inputs, values kept away from kinks, hypothesis strategies.

Imported by the test modules next to it (pytest puts this folder on the import path, as it does
for every test folder without an __init__.py).
"""
import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import disttrain as dt
from disttrain.autograd.gradcheck import gradcheck, gradgradcheck

# Small, fast, reproducible: no example database on disk, no per-example deadline.
SETTINGS = settings(max_examples=40, deadline=None, database=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])
FEW = settings(SETTINGS, max_examples=15)

# Central differences with eps=1e-6 are exact to ~1e-10 for smooth functions; a kink closer than
# MARGIN to an input would make them meaningless, so inputs stay at least MARGIN away from one.
MARGIN = 0.1

seeds = st.integers(0, 2**32 - 1)


def leaf(array, requires_grad=True):
    """A float64 leaf tensor owning a contiguous copy of `array` (gradcheck perturbs it in place)."""
    return dt.tensor(np.array(array, dtype=np.float64, order="C"), requires_grad=requires_grad)


def uniform(rng, shape, low=-1.0, high=1.0, requires_grad=True):
    return leaf(rng.uniform(low, high, size=shape), requires_grad)


def away_from_zero(rng, shape, low=MARGIN, high=1.5, requires_grad=True):
    """Values with |v| in [low, high] and a random sign (for relu, abs, division)."""
    magnitude = rng.uniform(low, high, size=shape)
    sign = np.where(rng.random(size=shape) < 0.5, -1.0, 1.0)
    return leaf(magnitude * sign, requires_grad)


def distinct(rng, shape, gap=MARGIN, requires_grad=True):
    """All values different by at least `gap` (no ties for max/min/max_pool)."""
    n = int(np.prod(shape, dtype=np.int64))
    values = (rng.permutation(n) - n / 2) * gap + rng.uniform(0, gap / 4, size=n)
    return leaf(values.reshape(shape), requires_grad)


def grid_pair(rng, shape_a, shape_b):
    """Two tensors whose elements differ by at least MARGIN pairwise (for maximum, under broadcasting).

    a sits near integers, b near half-integers: |a_i - b_j| >= 0.5 - 2 * 0.2 = MARGIN.
    """
    a = rng.integers(-2, 3, size=shape_a) + rng.uniform(-0.2, 0.2, size=shape_a)
    b = rng.integers(-2, 3, size=shape_b) + 0.5 + rng.uniform(-0.2, 0.2, size=shape_b)
    return leaf(a), leaf(b)


def check(fn, *inputs):
    """gradcheck with its default (tight) tolerances; raises GradcheckError naming the bad element."""
    assert gradcheck(fn, inputs)


def check_second_order(fn, *inputs):
    """gradgradcheck held to gradcheck's tolerances (atol 1e-7, rtol 1e-5), not its looser defaults."""
    assert gradgradcheck(fn, list(inputs), atol=1e-7, rtol=1e-5)


# ---- hypothesis strategies --------------------------------------------------------------------
def shapes(min_dims=0, max_dims=3, min_side=1, max_side=4):
    return hnp.array_shapes(min_dims=min_dims, max_dims=max_dims, min_side=min_side, max_side=max_side)


def broadcast_pairs(min_dims=0, max_dims=3, max_side=3):
    """Pairs of mutually broadcastable shapes, e.g. ((3, 1), (4,)) or ((), (2, 3))."""
    return hnp.mutually_broadcastable_shapes(num_shapes=2, min_dims=min_dims, max_dims=max_dims,
                                             max_side=max_side).map(lambda r: r.input_shapes)


@st.composite
def shape_and_axis(draw, min_dims=1, max_dims=3, max_side=4):
    """A shape and an axis argument for a reduction: None, an int (maybe negative) or a tuple of axes."""
    shape = draw(shapes(min_dims=min_dims, max_dims=max_dims, max_side=max_side))
    ndim = len(shape)
    kind = draw(st.sampled_from(["none", "int", "tuple"]))
    if kind == "none":
        return shape, None
    if kind == "int":
        return shape, draw(st.integers(-ndim, ndim - 1))
    axes = draw(st.lists(st.integers(0, ndim - 1), min_size=1, max_size=ndim, unique=True))
    negate = draw(st.lists(st.booleans(), min_size=len(axes), max_size=len(axes)))
    return shape, tuple(a - ndim if neg else a for a, neg in zip(axes, negate))
