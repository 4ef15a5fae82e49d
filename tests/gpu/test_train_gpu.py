"""Single-GPU local mode: the CUDA backend's memory figures. (The training steps on the GPU against the
CPU's are tests/kernels_cuda/test_training_steps_on_cuda_kernels.py, which also runs them on the CPU
with the CUDA kernels emulated.)"""
import pytest

import disttrain as dt

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not dt.cuda_available(), reason="needs a CUDA GPU")]


def test_cuda_backend_reports_memory_pool_figures():
    from disttrain.tensor.backend import cuda_backend

    backend = cuda_backend()
    x = dt.zeros(1024, 1024, device="cuda")
    stats = backend.memory_stats()
    assert stats["used_bytes"] >= x.numel() * 4 and stats["pool_bytes"] >= stats["used_bytes"]
    backend.synchronize()
