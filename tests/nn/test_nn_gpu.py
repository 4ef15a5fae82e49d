"""nn on the GPU: modules move in place and agree with the CPU (skipped without CUDA)."""
import numpy as np
import pytest

import disttrain as dt
from disttrain import nn

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not dt.cuda_available(), reason="needs a CUDA GPU")]


def test_cnn_on_cuda_matches_cpu_and_round_trips_state_dict():
    dt.manual_seed(0)
    cpu = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                        nn.LayerNorm(64), nn.Linear(64, 3))
    gpu = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                        nn.LayerNorm(64), nn.Linear(64, 3))
    gpu.load_state_dict(cpu.state_dict())
    params = list(gpu.parameters())
    assert gpu.to("cuda") is gpu and all(a is b for a, b in zip(params, gpu.parameters()))
    assert all(p.device == "cuda" for p in gpu.parameters())
    x = np.random.default_rng(0).standard_normal((2, 1, 8, 8)).astype(np.float32)
    out_cpu, out_gpu = cpu(dt.tensor(x)), gpu(dt.tensor(x, device="cuda"))
    np.testing.assert_allclose(out_gpu.numpy(), out_cpu.numpy(), rtol=1e-4, atol=1e-5)
    out_cpu.sum().backward()
    out_gpu.sum().backward()
    total_cpu = nn.utils.clip_grad_norm_(cpu.parameters(), 0.1)
    total_gpu = nn.utils.clip_grad_norm_(gpu.parameters(), 0.1)
    assert total_gpu == pytest.approx(total_cpu, rel=1e-4)
    for (name, a), b in zip(cpu.named_parameters(), gpu.parameters()):
        np.testing.assert_allclose(b.grad.numpy(), a.grad.numpy(), rtol=1e-3, atol=1e-5, err_msg=name)
    cpu.load_state_dict(gpu.state_dict())  # device -> host copy
    nn.init.normal_(gpu[5].weight)  # drawn on the host, copied to the device
    assert gpu[5].weight.device == "cuda"
    gpu.cpu()
    assert all(p.device == "cpu" for p in gpu.parameters())
