"""`disttrain demo`: train an MLP on generated 2-D spirals and a small CNN on generated 8x8 patterns.

A self-contained smoke run of the whole engine (ops, autograd, nn, optim) that needs no data.
"""
import sys
import time

import numpy as np
from tqdm import tqdm

import disttrain as dt
from disttrain import nn
from disttrain.nn import functional as F


def spirals(n_per_class=200, classes=3, seed=0):
    """Interleaved noisy spirals: (n, 2) float32 points, (n,) int64 labels."""
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for c in range(classes):
        r = np.linspace(0.05, 1.0, n_per_class)
        theta = np.linspace(c * 4.0, (c + 1) * 4.0, n_per_class) + rng.normal(0, 0.15, n_per_class)
        xs.append(np.stack([r * np.sin(theta), r * np.cos(theta)], axis=1))
        ys.append(np.full(n_per_class, c))
    return np.concatenate(xs).astype(np.float32), np.concatenate(ys).astype(np.int64)


def patterns(n=512, seed=0):
    """8x8 single-channel images of four patterns (bars, crosses, boxes, diagonals) plus noise."""
    rng = np.random.default_rng(seed)
    base = np.zeros((4, 8, 8), np.float32)
    base[0, :, 3:5] = 1
    base[1, 3:5, :] = 1
    base[1, :, 3:5] = 1
    base[2, 1:7, 1] = base[2, 1:7, 6] = base[2, 1, 1:7] = base[2, 6, 1:7] = 1
    base[3] = np.eye(8) + np.fliplr(np.eye(8))
    labels = rng.integers(0, 4, n)
    shifts = rng.integers(-1, 2, (n, 2))
    images = np.stack([np.roll(base[k], tuple(s), axis=(0, 1)) for k, s in zip(labels, shifts)])
    images += rng.normal(0, 0.3, images.shape).astype(np.float32)
    return images[:, None], labels.astype(np.int64)


def fit(model, x, y, steps, lr, desc):
    opt = dt.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    xt, yt = dt.tensor(x), dt.tensor(y)
    bar = tqdm(range(steps), desc=desc, mininterval=0.5, disable=not sys.stderr.isatty())  # no bar into a log
    for _ in bar:
        loss = F.cross_entropy(model(xt), yt)
        opt.zero_grad()
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    with dt.no_grad():
        accuracy = float((model(xt).numpy().argmax(axis=1) == y).mean())
    return loss.item(), accuracy


def main(args=None):
    dt.manual_seed(0)
    start = time.perf_counter()
    x, y = spirals()
    mlp = nn.Sequential(nn.Linear(2, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 3))
    loss, acc = fit(mlp, x, y, steps=600, lr=0.1, desc="MLP on spirals")
    print(f"MLP  (2-64-64-3) on {len(y)} spiral points: loss {loss:.4f}, training accuracy {acc:.1%}")
    images, labels = patterns()
    cnn = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                        nn.Linear(8 * 4 * 4, 4))
    loss, acc = fit(cnn, images, labels, steps=60, lr=0.05, desc="CNN on patterns")
    print(f"CNN  (conv3x3-8, pool, linear) on {len(labels)} 8x8 images: loss {loss:.4f}, training accuracy {acc:.1%}")
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0
