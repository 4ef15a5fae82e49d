"""Transformer LM: peak memory of a training step against depth, with and without per-block checkpointing.

TransformerLanguageModel (vocabulary 96 as the char-level default corpus, d_model 64, 4 heads, d_ff 256,
float32), one window of T = 128 tokens x B = 8 streams, loss = forward_loss, for layers L = 2 ... 16 and
three settings of checkpoint_segments: none; L (every block its own checkpointed segment: the blocks'
inputs are kept, one block's activations at a time are rebuilt in backward); "sqrt" (round(sqrt(L))
segments of blocks).

Memory is the MemoryMeter peak above the start of one training step (forward + backward), after a warm-up
step and zero_grad(set_to_none=False) so the parameter gradients already exist: what the step needs on top
of the model. The slope is the least-squares bytes per added layer over L; the ratio compares each setting
with none side by side. The step time of L = 8 with per-block checkpointing against none is measured in
interleaved rounds (benchmarks/harness.py, median, process CPU seconds, single-threaded BLAS).

    python benchmarks/bench_transformer_memory.py [--rounds 5]
"""
import argparse
import os
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before NumPy loads BLAS: steadier CPU times when shared

import numpy as np  # noqa: E402

import disttrain as dt  # noqa: E402
from disttrain.checkpointing import MemoryMeter  # noqa: E402
from disttrain.models import TransformerLanguageModel  # noqa: E402
from harness import interleaved, machine  # noqa: E402

VOCAB, WIDTH, HEADS, FF, STEPS, BATCH = 96, 64, 4, 256, 128, 8
LAYERS = (2, 4, 8, 16)
SETTINGS = {"none": lambda layers: None, "per block": lambda layers: layers, "sqrt": lambda layers: "sqrt"}


def model_and_window(layers):
    dt.manual_seed(0)
    model = TransformerLanguageModel(VOCAB, d_model=WIDTH, heads=HEADS, layers=layers, d_ff=FF, max_len=STEPS)
    rng = np.random.default_rng(0)
    tokens, targets = (dt.tensor(rng.integers(0, VOCAB, (STEPS, BATCH))) for _ in range(2))
    return model, tokens, targets


def train_step(model, tokens, targets):
    loss, _ = model.forward_loss(tokens, targets)
    loss.backward()


def step_peak(layers, segments):
    """Peak bytes above the start of one metered training step."""
    model, tokens, targets = model_and_window(layers)
    model.checkpoint_segments = segments
    train_step(model, tokens, targets)
    model.zero_grad(set_to_none=False)
    with MemoryMeter() as meter:
        train_step(model, tokens, targets)
    return meter.peak_bytes - meter.start_bytes


def slope(xs, ys):
    """Least-squares bytes per layer."""
    return float(np.polyfit(np.asarray(xs, float), np.asarray(ys, float), 1)[0])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print(machine())
    print(f"d_model {WIDTH}, heads {HEADS}, d_ff {FF}, vocabulary {VOCAB}, window T={STEPS} x B={BATCH}, float32")
    peaks = {name: [step_peak(layers, choose(layers)) for layers in LAYERS] for name, choose in SETTINGS.items()}
    print(f"\n{'layers':>8}" + "".join(f"{name + ' MiB':>16}" for name in SETTINGS) + f"{'per block/none':>16}"
          + f"{'sqrt/none':>12}")
    for i, layers in enumerate(LAYERS):
        row = "".join(f"{peaks[name][i] / 2**20:16.3f}" for name in SETTINGS)
        print(f"{layers:8d}{row}{peaks['per block'][i] / peaks['none'][i]:16.3f}"
              f"{peaks['sqrt'][i] / peaks['none'][i]:12.3f}")
    slopes = {name: slope(LAYERS, peaks[name]) for name in SETTINGS}
    print("\nslope (MiB per layer): " + ", ".join(f"{name} {s / 2**20:.3f}" for name, s in slopes.items()))
    print(f"slope ratio per block / none: {slopes['per block'] / slopes['none']:.3f}, "
          f"sqrt / none: {slopes['sqrt'] / slopes['none']:.3f}")

    models = {name: model_and_window(8) for name in ("none", "per block")}
    models["per block"][0].checkpoint_segments = 8

    def run(name):
        def once():
            model, tokens, targets = models[name]
            model.zero_grad(set_to_none=False)
            train_step(model, tokens, targets)
            return 1
        return once

    rates = interleaved({name: run(name) for name in models}, rounds=args.rounds, clock=time.process_time)
    none_ms, block_ms = 1e3 / rates["none"], 1e3 / rates["per block"]
    print(f"\nstep time L=8 (CPU, median of {args.rounds} interleaved rounds): none {none_ms:.1f} ms, "
          f"per block {block_ms:.1f} ms, ratio {block_ms / none_ms:.2f}x")


if __name__ == "__main__":
    main()
