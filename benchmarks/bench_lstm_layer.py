"""One LSTM layer, forward + backward over a segment: disttrain's nn.LSTM against PyTorch's, side by side.

PyTorch runs its CPU LSTM on oneDNN (`aten::mkldnn_rnn_layer`), where ours is the compiled recurrence.

The shapes are the shipped jobs' layers: ptb_small's (T, B, in, H) = (20, 20, 200, 200) and the char LM's
(64, 32, 64, 256), float32, from a zero state. Reports milliseconds per forward + backward (median of
interleaved rounds) and PyTorch's time over ours; `--one-core` runs every side on one thread, timed by
this process's CPU time. The recurrence's GEMMs are most of the layer (docs/ARCHITECTURE.md, "Compiled CPU
kernels": the packed W_hh).

    python benchmarks/bench_lstm_layer.py [--rounds 9] [--one-core]
"""
import argparse
import os

import numpy as np

import disttrain as dt
from harness import add_one_core_flag, interleaved, machine, one_core_clock, repeat, torch_or_none

CALLS_PER_ROUND = 10
SHAPES = {"ptb_small": (20, 20, 200, 200), "char LM": (64, 32, 64, 256)}


def layer_data(rng, steps, batch, features, hidden):
    x = rng.standard_normal((steps, batch, features)).astype(np.float32)
    grad = rng.standard_normal((steps, batch, hidden)).astype(np.float32)
    return x, grad


def ours(shape, x, grad):
    """fn() -> calls: forward + backward of disttrain's one-layer nn.LSTM."""
    dt.manual_seed(0)
    lstm = dt.nn.LSTM(shape[2], shape[3])
    g = dt.tensor(grad)

    def step():
        lstm.zero_grad()
        out, _ = lstm(dt.tensor(x, requires_grad=True))
        out.backward(g)

    return repeat(step, CALLS_PER_ROUND)


def theirs(torch, shape, x, grad):
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(shape[2], shape[3])
    x0, g = torch.from_numpy(x), torch.from_numpy(grad)

    def step():
        lstm.zero_grad()
        out, _ = lstm(x0.clone().requires_grad_(True))
        out.backward(g)

    return repeat(step, CALLS_PER_ROUND)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    add_one_core_flag(parser)
    args = parser.parse_args()
    torch = torch_or_none()
    clock = one_core_clock(args, dt, torch)
    rng = np.random.default_rng(0)
    candidates = {}
    for name, shape in SHAPES.items():
        x, grad = layer_data(rng, *shape)
        candidates[f"disttrain {name}"] = ours(shape, x, grad)
        if torch is not None:
            candidates[f"pytorch {name}"] = theirs(torch, shape, x, grad)
    load_before = os.getloadavg()[0]
    rates = interleaved(candidates, rounds=args.rounds, clock=clock)
    load_after = os.getloadavg()[0]
    print(f"one LSTM layer, forward + backward, float32; {machine()}")
    for name, (steps, batch, features, hidden) in SHAPES.items():
        ms = 1e3 / rates[f"disttrain {name}"]
        line = f"  {name:10s} (T {steps}, B {batch}, in {features}, H {hidden}): disttrain {ms:7.3f} ms"
        if torch is not None:
            theirs_ms = 1e3 / rates[f"pytorch {name}"]
            line += f"   pytorch {theirs_ms:7.3f} ms   {theirs_ms / ms:5.2f}x PyTorch"
        print(line)
    print(f"  load average (1 min) {load_before:.2f} before, {load_after:.2f} after, on {os.cpu_count()} cores; "
          + ("one thread per side, CPU time" if args.one_core else f"{dt.get_num_threads()} threads, wall time"))


if __name__ == "__main__":
    main()
