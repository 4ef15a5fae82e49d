"""Fixtures for the checkpointing tests."""
import pytest

from disttrain.checkpointing.checkpoint import Checkpoint


def _checkpoint_nodes(t):
    """Number of Checkpoint nodes in t's graph."""
    seen, stack, count = set(), [t.grad_fn], 0
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        count += isinstance(node, Checkpoint)
        stack += [e[0] for e in node.next_edges if e is not None]
    return count


@pytest.fixture
def checkpoint_nodes():
    """checkpoint_nodes(t) -> how many checkpointed calls t's graph records."""
    return _checkpoint_nodes
