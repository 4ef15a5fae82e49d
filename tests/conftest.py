"""Fixtures shared by every test package, and the skip policy's hooks (tests/skip_policy.py)."""
import numpy as np
import pytest

import skip_policy

from disttrain.autograd import grad_mode
from disttrain.checkpointing.checkpoint import Checkpoint

def pytest_addoption(parser):
    parser.addoption("--require-tools", action="store_true", default=False,
                     help="fail tests skipped for a missing tool or data set (as CI=true and "
                          "DISTTRAIN_REQUIRE_ALL=1 do)")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    skip_policy.fail_if_required(outcome.get_result(), item.config)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    skip_policy.fail_if_required(outcome.get_result(), collector.config)


def pytest_terminal_summary(terminalreporter):
    skip_policy.record(terminalreporter)


WORDS = ("the a cat dog sat on mat ran far and then it was good bad big small red fox jumps over lazy "
         "quick brown end begin loop step time").split()


def _make_text(n_chars=3000, seed=0):
    """Pseudo-sentences of a small vocabulary: learnable structure, deterministic."""
    rng = np.random.default_rng(seed)
    out, size = [], 0
    while size < n_chars:
        sentence = " ".join(WORDS[k] for k in rng.integers(0, len(WORDS), rng.integers(3, 9))) + ".\n"
        out.append(sentence)
        size += len(sentence)
    return "".join(out)[:n_chars]


@pytest.fixture(autouse=True)
def grad_mode_is_restored(request):
    """Fail the test that leaves grad mode off (and switch it back on), not the unrelated tests after it.

    Grad mode is one flag per process; parameter servers run in threads of the test process here, and two
    of them updating at once (each inside no_grad) can restore each other's saved mode out of order."""
    yield
    if not grad_mode.is_grad_enabled():
        grad_mode.set_grad_enabled(True)
        pytest.fail(f"{request.node.nodeid} left grad mode off (no_grad entered and exited out of order, "
                    f"e.g. by two threads at once)", pytrace=False)


@pytest.fixture
def make_text():
    """make_text(n_chars=3000, seed=0) -> a few KB of generated text for tiny char-level jobs."""
    return _make_text


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


@pytest.fixture
def kernel_calls(monkeypatch):
    """kernel_calls(*names) -> a list: makes the compiled table the CPU backend's and appends the name of
    each of those kernels to the list whenever it is called (for the test's duration)."""
    from disttrain.kernels_cpu import wrappers
    from disttrain.tensor import backend

    def spy_on(*names):
        called = []
        for name in names:
            original = getattr(wrappers, name)

            def spy(*args, _original=original, _name=name, **kwargs):
                called.append(_name)
                return _original(*args, **kwargs)

            monkeypatch.setattr(wrappers, name, spy)
        monkeypatch.setattr(backend.CPU, "kernels", wrappers)
        return called

    return spy_on
