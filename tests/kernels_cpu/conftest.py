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
