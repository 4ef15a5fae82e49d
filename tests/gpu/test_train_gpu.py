"""Single-GPU local mode: the ptb_small job's first steps on --device cuda follow the CPU's loss curve.

Uses jobs/ptb_small.toml when it exists and its PTB files are there; otherwise the same model and
optimizer (Zaremba's small LSTM: 2 x 200, batch 20, bptt 20, SGD lr 1, clip 5) on the embedded
default corpus, so the check runs on any GPU machine. Dropout is set to 0 for the comparison (the
two devices draw different masks).
"""
from pathlib import Path

import numpy as np
import pytest

import disttrain as dt
from disttrain import optim
from disttrain.models import LSTMLanguageModel
from disttrain.nn import functional as F
from disttrain.nn.utils import clip_grad_norm_
from disttrain.train import Trainer
from disttrain.train.jobspec import JobSpecError, check_paths, load_job, loads_job

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not dt.cuda_available(), reason="needs a CUDA GPU")]

ROOT = Path(__file__).resolve().parents[2]
STEPS = 8
PTB_SMALL_LIKE = """
[model]
hidden = 200
layers = 2
init_scale = 0.1
[data]
kind = "default_corpus"
max_bytes = 200000
batch_size = 20
bptt = 20
[optim]
kind = "sgd"
lr = 1.0
clip_norm = 5.0
[train]
epochs = 1
checkpoint_every = 0
seed = 0
"""


def _spec(device):
    overrides = [f"train.device={device}", "model.dropout=0.0", f"train.max_steps={STEPS}"]
    job = ROOT / "jobs" / "ptb_small.toml"
    if job.is_file():
        try:
            spec = load_job(job, overrides)
            check_paths(spec)
            return spec
        except JobSpecError:
            pass  # no PTB files here: the stand-in below
    return loads_job(PTB_SMALL_LIKE, overrides, source="ptb_small-like (default corpus)")


def test_first_steps_follow_the_cpu_loss_curve():
    curves = {}
    for device in ("cpu", "cuda"):
        trainer = Trainer(_spec(device), progress=False)
        curve = []
        for k, (inputs, targets) in enumerate(trainer.train_iter):
            if k == STEPS:
                break
            curve.append(trainer.train_step(inputs, targets))
        curves[device] = np.array(curve)
        assert trainer.model.embedding.weight.device == device
    losses_cpu, norms_cpu = curves["cpu"].T
    losses_gpu, norms_gpu = curves["cuda"].T
    np.testing.assert_allclose(losses_gpu, losses_cpu, rtol=1e-4)   # float32 on both, different summation orders
    np.testing.assert_allclose(norms_gpu, norms_cpu, rtol=1e-3)
    assert losses_gpu[-1] < losses_gpu[0]


def test_float64_language_model_steps_agree_tightly():
    """The same steps in float64 without the Trainer: every fused kernel of the step, tight tolerance."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 50, (6, 20, 4))
    results = {}
    for device in ("cpu", "cuda"):
        dt.manual_seed(0)
        model = LSTMLanguageModel(50, hidden=32, layers=2).double().to(device)
        params = list(model.parameters())
        opt = optim.SGD(params, lr=1.0, momentum=0.5)
        state, losses = None, []
        for seg in tokens:
            logits, (h, c) = model(dt.tensor(seg[:-1], device=device), state)
            loss = F.cross_entropy(logits, dt.tensor(seg[1:].reshape(-1), device=device))
            opt.zero_grad()
            loss.backward()
            clip_grad_norm_(params, 0.5)
            opt.step()
            state = (h.detach(), c.detach())
            losses.append(loss.item())
        results[device] = losses, [p.numpy() for p in params]
    np.testing.assert_allclose(results["cuda"][0], results["cpu"][0], rtol=1e-10)
    for a, b in zip(results["cuda"][1], results["cpu"][1]):
        np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-10)


def test_cuda_backend_reports_memory_pool_figures():
    from disttrain.tensor.backend import cuda_backend

    backend = cuda_backend()
    x = dt.zeros(1024, 1024, device="cuda")
    stats = backend.memory_stats()
    assert stats["used_bytes"] >= x.numel() * 4 and stats["pool_bytes"] >= stats["used_bytes"]
    backend.synchronize()
