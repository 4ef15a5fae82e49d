"""Fixtures of the compiled CPU kernels' tests."""
import pytest

from disttrain.tensor import threads


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def num_threads(request):
    """Run the test with this many intra-op threads (and BLAS threads), restored afterwards."""
    before = threads.get_num_threads()
    threads.set_num_threads(request.param)
    yield request.param
    threads.set_num_threads(before)


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
