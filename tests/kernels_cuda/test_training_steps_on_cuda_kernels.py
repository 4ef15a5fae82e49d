"""Training steps on the CUDA kernels follow the same steps on the NumPy kernels.

Run two ways (the `cuda_kernels` fixture, conftest.py): on a GPU (`--device cuda`, marked `gpu`), and
in CI on the CPU with the CPU backend's kernels swapped for the CUDA wrappers over emulated kernels,
so every op's call into the CUDA kernels (arguments, what forward keeps for backward, the
scatter-add) is exercised by whole training steps without a GPU.

  - the ptb_small job's first steps follow the CPU's loss and gradient-norm curve (float32). On a GPU
    it uses jobs/ptb_small.toml when the PTB files are there; otherwise, and always when emulated
    (one CPU thread runs every GPU thread), the same model and optimizer (Zaremba's small LSTM: 2 x
    200, batch 20, bptt 20, SGD lr 1, clip 5) on the embedded default corpus. Dropout is off: the two
    runs draw different masks.
  - float64 language-model steps with momentum and clipping agree tightly, parameters included.
"""
from pathlib import Path

import numpy as np

import disttrain as dt
from disttrain import optim
from disttrain.models import LSTMLanguageModel
from disttrain.nn import functional as F
from disttrain.nn.utils import clip_grad_norm_
from disttrain.train import Trainer
from disttrain.train.jobspec import JobSpecError, check_paths, load_job, loads_job

ROOT = Path(__file__).resolve().parents[2]
STEPS = 8
# kernels a step must have launched when emulated (so the comparison is not NumPy against NumPy)
STEP_KERNELS = {"lstm_cell_forward", "lstm_cell_backward", "xent_backward", "index_add_rows", "sgd_step",
                "norm_accumulate", "norm_finalize"}
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


def _spec(device, use_ptb):
    overrides = [f"train.device={device}", "model.dropout=0.0", f"train.max_steps={STEPS}"]
    job = ROOT / "jobs" / "ptb_small.toml"
    if use_ptb and job.is_file():
        try:
            spec = load_job(job, overrides)
            check_paths(spec)
            return spec
        except JobSpecError:
            pass  # no PTB files here: the stand-in below
    return loads_job(PTB_SMALL_LIKE, overrides, source="ptb_small-like (default corpus)")


def _first_steps(device, use_ptb):
    trainer = Trainer.from_job(_spec(device, use_ptb), progress=False)
    curve = []
    for k, (inputs, targets) in enumerate(trainer.train_iter):
        if k == STEPS:
            break
        curve.append(trainer.train_step(inputs, targets))
    assert trainer.model.embedding.weight.device == device
    return np.array(curve)


def test_first_steps_follow_the_cpu_loss_curve(cuda_kernels):
    device, context = cuda_kernels
    use_ptb = device == "cuda"
    losses_cpu, norms_cpu = _first_steps("cpu", use_ptb).T
    with context() as launched:
        losses, norms = _first_steps(device, use_ptb).T
    assert launched is None or STEP_KERNELS <= launched, launched
    np.testing.assert_allclose(losses, losses_cpu, rtol=1e-4)   # float32 on both, different summation orders
    np.testing.assert_allclose(norms, norms_cpu, rtol=1e-3)
    assert losses[-1] < losses[0]


def _float64_lm_steps(device):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 50, (6, 20, 4))
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
    return losses, [p.numpy() for p in params]


def test_float64_language_model_steps_agree_tightly(cuda_kernels):
    """The same steps in float64 without the Trainer: every fused kernel of the step, tight tolerance."""
    device, context = cuda_kernels
    losses_cpu, params_cpu = _float64_lm_steps("cpu")
    with context() as launched:
        losses, params = _float64_lm_steps(device)
    assert launched is None or STEP_KERNELS | {"xent_forward_warp"} <= launched, launched
    np.testing.assert_allclose(losses, losses_cpu, rtol=1e-10)
    for a, b in zip(params, params_cpu):
        np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-10)
