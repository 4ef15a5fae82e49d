"""Sharding: every element in exactly one part, balanced loads, one fingerprint per layout."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from disttrain.paramserver.sharding import Layout, ParamSpec

shapes = st.lists(st.tuples(st.integers(1, 300), st.integers(1, 40)), min_size=1, max_size=8)


def specs(sizes, dtype="<f4"):
    return [ParamSpec(f"p{i}", shape, dtype) for i, shape in enumerate(sizes)]


@settings(max_examples=100, deadline=None)
@given(sizes=shapes, servers=st.integers(1, 6))
def test_parts_cover_each_element_once_and_loads_are_even(sizes, servers):
    layout = Layout(specs(sizes), servers)
    for i, spec in enumerate(layout.params):
        covered = np.zeros(spec.size, dtype=int)
        for p in layout.parts:
            if p.param == i:
                covered[p.offset:p.offset + p.length] += 1
        assert (covered == 1).all()
    assert [p.key for p in layout.parts] == list(range(len(layout.parts)))
    assert max(p.length for p in layout.parts) <= layout.limit
    assert max(layout.loads()) <= layout.total / servers + layout.limit       # LPT with small parts
    assert sum(layout.loads()) == layout.total


def test_one_large_tensor_is_spread_over_all_servers():
    layout = Layout(specs([(4096, 1024), (1024, 1), (10, 1)]), 4)
    loads = layout.loads()
    assert min(loads) > 0 and max(loads) <= 1.25 * layout.total / 4
    assert {p.server for p in layout.parts if p.param == 0} == {0, 1, 2, 3}


def test_one_server_cuts_nothing():
    layout = Layout(specs([(100, 3), (7, 1)]), 1)
    assert [(p.param, p.offset, p.length) for p in layout.parts] == [(0, 0, 300), (1, 0, 7)]


def test_fingerprint_is_deterministic_and_sensitive():
    a = Layout(specs([(10, 10), (5, 1)]), 2)
    assert a.fingerprint == Layout(specs([(10, 10), (5, 1)]), 2).fingerprint
    assert len(a.fingerprint) == 64
    others = [Layout(specs([(10, 10), (5, 1)]), 3), Layout(specs([(10, 10), (5, 2)]), 2),
              Layout(specs([(10, 10), (5, 1)], "<f8"), 2)]
    assert len({a.fingerprint, *(o.fingerprint for o in others)}) == 4


def test_from_named_arrays_and_bad_input():
    layout = Layout.from_named_arrays([("w", np.zeros((3, 4), "<f8")), ("b", np.zeros(4, "<f8"))], 1)
    assert [p.dtype for p in layout.params] == ["<f8", "<f8"] and layout.total == 16
    with pytest.raises(ValueError, match="unique"):
        Layout(specs([(1, 1)]) * 2, 1)
    with pytest.raises(ValueError, match="num_servers"):
        Layout(specs([(1, 1)]), 0)
