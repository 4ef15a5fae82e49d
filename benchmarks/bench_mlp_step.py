"""MLP training step, disttrain vs PyTorch CPU, side by side.

Batch 256, 784 -> 3 x 1024 (ReLU) -> 10, float32, cross-entropy, SGD(lr=0.01).
Prints steps/s for both and the ratio ours / PyTorch (target >= 1.0). On a busy machine
`--one-core` times both sides on one thread by this process's CPU time. The step's GEMMs alone
(the forward products, the backward's two products and bias column sums, on the step's shapes;
NumPy's BLAS for us, torch's for PyTorch) run in the same rounds, to show what is left outside them.

    python benchmarks/bench_mlp_step.py [--steps 20] [--rounds 7] [--one-core]
"""
import argparse
import os

import disttrain as dt  # first, as in `disttrain run`: it sets OpenBLAS's idle-thread wait before NumPy loads it
import numpy as np
from harness import add_one_core_flag, interleaved, machine, one_core_clock, repeat, torch_or_none

BATCH, IN, HIDDEN, LAYERS, CLASSES = 256, 784, 1024, 3, 10


def make_ours(x, y):
    dt.manual_seed(0)
    layers = []
    sizes = [IN] + [HIDDEN] * LAYERS
    for a, b in zip(sizes, sizes[1:]):
        layers += [dt.nn.Linear(a, b), dt.nn.ReLU()]
    model = dt.nn.Sequential(*layers, dt.nn.Linear(HIDDEN, CLASSES))
    opt = dt.optim.SGD(model.parameters(), lr=0.01)
    xt, yt = dt.tensor(x), dt.tensor(y)

    def step():
        loss = dt.nn.functional.cross_entropy(model(xt), yt)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss

    return step


def make_torch(torch, x, y):
    torch.manual_seed(0)
    layers = []
    sizes = [IN] + [HIDDEN] * LAYERS
    for a, b in zip(sizes, sizes[1:]):
        layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
    model = torch.nn.Sequential(*layers, torch.nn.Linear(HIDDEN, CLASSES))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)

    def step():
        loss = torch.nn.functional.cross_entropy(model(xt), yt)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss

    return step


def step_gemms(mm, transpose, column_sums, x, weights):
    """A step's GEMMs alone: forward x @ w.T per layer, backward g @ w (not for the input) and g.T @ x per layer,
    and the bias gradients' column sums; g is taken as the layer's output, a tensor of the right shape."""
    def run():
        h = x
        outs = []
        for w in weights:
            outs.append((h, mm(h, transpose(w))))
            h = outs[-1][1]
        for i, (h, g) in enumerate(outs):
            if i:
                mm(g, weights[i])
            mm(transpose(g), h)
            column_sums(g)

    return run


def gemm_weights(lib_randn):
    sizes = [IN] + [HIDDEN] * LAYERS + [CLASSES]
    return [lib_randn(b, a) for a, b in zip(sizes, sizes[1:])]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=7)
    add_one_core_flag(parser)
    args = parser.parse_args()
    torch = torch_or_none()
    clock = one_core_clock(args, dt, torch)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((BATCH, IN)).astype(np.float32)
    y = rng.integers(0, CLASSES, BATCH).astype(np.int64)
    candidates = {"disttrain": repeat(make_ours(x, y), args.steps)}
    if torch is not None:
        candidates["pytorch"] = repeat(make_torch(torch, x, y), args.steps)
    rng_weights = gemm_weights(lambda r, c: rng.standard_normal((r, c)).astype(np.float32))
    ones = np.ones(BATCH, dtype=np.float32)
    candidates["numpy GEMMs"] = repeat(step_gemms(np.matmul, np.transpose, lambda g: ones @ g, x, rng_weights),
                                       args.steps)
    if torch is not None:
        candidates["torch GEMMs"] = repeat(step_gemms(torch.mm, torch.t, lambda g: g.sum(0), torch.from_numpy(x),
                                                      [torch.from_numpy(w) for w in rng_weights]), args.steps)
    flops = 6 * BATCH * (IN * HIDDEN + (LAYERS - 1) * HIDDEN * HIDDEN + HIDDEN * CLASSES)  # fwd + 2x bwd GEMMs
    load_before = os.getloadavg()[0]
    rates = interleaved(candidates, rounds=args.rounds, clock=clock)
    load_after = os.getloadavg()[0]
    print(f"MLP step, batch {BATCH}, {IN}-{'-'.join([str(HIDDEN)] * LAYERS)}-{CLASSES}, float32, SGD; {machine()}")
    gemm_rates = {name: rates.pop(name) for name in ("numpy GEMMs", "torch GEMMs") if name in rates}
    for name, rate in rates.items():
        print(f"  {name:10s} {rate:8.2f} steps/s   {rate * BATCH:9.0f} samples/s   {rate * flops / 1e9:6.1f} GFLOP/s")
    for (name, rate), gemms in zip(rates.items(), gemm_rates.items()):
        print(f"  {gemms[0]:12s} alone {1e3 / gemms[1]:6.2f} ms a step ({gemms[1] * flops / 1e9:6.1f} GFLOP/s): "
              f"{rate / gemms[1]:.0%} of {name}'s step")
    if "pytorch" in rates:
        print(f"  ratio disttrain / pytorch = {rates['disttrain'] / rates['pytorch']:.2f}x  (target >= 1.0)")
    else:
        print("  (torch not installed: no comparator; pip install torch==2.13.0)")
    print(f"  load average (1 min) {load_before:.2f} before, {load_after:.2f} after, on {os.cpu_count()} cores"
          + ("; one thread per side, CPU time" if args.one_core else "; wall time"))


if __name__ == "__main__":
    main()
