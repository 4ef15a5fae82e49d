"""MLP training step, disttrain vs PyTorch CPU, side by side.

Batch 256, 784 -> 3 x 1024 (ReLU) -> 10, float32, cross-entropy, SGD(lr=0.01).
Prints steps/s for both and the ratio ours / PyTorch (target >= 1.0).

    python benchmarks/bench_mlp_step.py [--steps 20] [--rounds 7]
"""
import argparse

import disttrain as dt  # first, as in `disttrain run`: it sets OpenBLAS's idle-thread wait before NumPy loads it
import numpy as np
from harness import interleaved, machine, torch_or_none

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


def repeat(step, n):
    def run():
        for _ in range(n):
            step()
        return n

    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((BATCH, IN)).astype(np.float32)
    y = rng.integers(0, CLASSES, BATCH).astype(np.int64)
    candidates = {"disttrain": repeat(make_ours(x, y), args.steps)}
    torch = torch_or_none()
    if torch is not None:
        candidates["pytorch"] = repeat(make_torch(torch, x, y), args.steps)
    flops = 6 * BATCH * (IN * HIDDEN + (LAYERS - 1) * HIDDEN * HIDDEN + HIDDEN * CLASSES)  # fwd + 2x bwd GEMMs
    rates = interleaved(candidates, rounds=args.rounds)
    print(f"MLP step, batch {BATCH}, {IN}-{'-'.join([str(HIDDEN)] * LAYERS)}-{CLASSES}, float32, SGD; {machine()}")
    for name, rate in rates.items():
        print(f"  {name:10s} {rate:8.2f} steps/s   {rate * BATCH:9.0f} samples/s   {rate * flops / 1e9:6.1f} GFLOP/s")
    if "pytorch" in rates:
        print(f"  ratio disttrain / pytorch = {rates['disttrain'] / rates['pytorch']:.2f}x  (target >= 1.0)")
    else:
        print("  (torch not installed: no comparator; pip install torch==2.13.0)")


if __name__ == "__main__":
    main()
