"""Scaled dot-product attention, forward + backward: disttrain's fused op against the same attention composed from
its matmuls and causal softmax, and against PyTorch's F.scaled_dot_product_attention, side by side.

The shape is the Transformer LM's (jobs/charlm_transformer.toml): q, k, v (B, H, T, E) = (32, 4, 64, 32) cut as
views from one (T, B, 3, H, E) projection, causal, float32. Reports milliseconds per forward + backward (median of
interleaved rounds) and the ratios; `--one-core` runs every side on one thread, timed by this process's CPU time.

    python benchmarks/bench_attention.py [--batch 32] [--heads 4] [--steps 64] [--width 32] [--rounds 9] [--one-core]
"""
import argparse
import math
import os

import numpy as np

import disttrain as dt
from disttrain.autograd import ops
from harness import add_one_core_flag, interleaved, machine, one_core_clock, repeat, torch_or_none

CALLS_PER_ROUND = 20


def projection(rng, steps, batch, heads, width):
    return rng.standard_normal((steps, batch, 3, heads, width)).astype(np.float32)


def ours(qkv, grad, fused):
    """fn() -> calls: forward + backward of our attention on views of one projection."""
    scale = 1 / math.sqrt(qkv.shape[-1])

    def step():
        x = dt.tensor(qkv, requires_grad=True)
        q, k, v = ops.unbind(x.permute(2, 1, 3, 0, 4), 0)
        if fused:
            out = ops.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            out = ops.masked_softmax((q @ k.swapaxes(-1, -2)) * scale, causal=True) @ v
        out.backward(grad)

    return repeat(step, CALLS_PER_ROUND)


def theirs(torch, qkv, grad):
    x0 = torch.from_numpy(qkv)
    g = torch.from_numpy(grad)

    def step():
        x = x0.clone().requires_grad_(True)
        q, k, v = x.permute(2, 1, 3, 0, 4).unbind(0)
        torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).backward(g)

    return repeat(step, CALLS_PER_ROUND)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--width", type=int, default=32, help="features per head (E)")
    parser.add_argument("--rounds", type=int, default=9)
    add_one_core_flag(parser)
    args = parser.parse_args()
    torch = torch_or_none()
    clock = one_core_clock(args, dt, torch)
    rng = np.random.default_rng(0)
    qkv = projection(rng, args.steps, args.batch, args.heads, args.width)
    grad = rng.standard_normal((args.batch, args.heads, args.steps, args.width)).astype(np.float32)
    candidates = {"disttrain fused": ours(qkv, grad, fused=True), "disttrain composed": ours(qkv, grad, fused=False)}
    if torch is not None:
        candidates["pytorch"] = theirs(torch, qkv, grad)
    load_before = os.getloadavg()[0]
    rates = interleaved(candidates, rounds=args.rounds, clock=clock)
    load_after = os.getloadavg()[0]
    print(f"causal attention, q k v ({args.batch}, {args.heads}, {args.steps}, {args.width}) float32 views of one "
          f"projection, forward + backward; {machine()}")
    fused = 1e3 / rates["disttrain fused"]
    for name, rate in rates.items():
        print(f"  {name:20s} {1e3 / rate:7.3f} ms   fused is {(1e3 / rate) / fused:5.2f}x as fast")
    print(f"  load average (1 min) {load_before:.2f} before, {load_after:.2f} after, on {os.cpu_count()} cores; "
          + ("one thread per side, CPU time" if args.one_core else f"{dt.get_num_threads()} threads, wall time"))


if __name__ == "__main__":
    main()
