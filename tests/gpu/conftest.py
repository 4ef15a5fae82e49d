"""GPU tests: every module here sets `pytestmark = GPU_ONLY` (marked `gpu`, skipped without a device).

    pytest -m gpu tests/gpu tests/nn/test_nn_gpu.py     # on a machine with a GPU and disttrain[cuda]
"""
import pytest


@pytest.fixture
def cp():
    import cupy

    return cupy
