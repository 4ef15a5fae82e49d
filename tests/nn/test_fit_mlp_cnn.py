"""End-to-end fitting: an MLP and a small CNN reach >= 99% training accuracy on generated data."""
import numpy as np

import disttrain as dt
from disttrain import nn
from disttrain.nn import functional as F


def two_spirals(n_per_class=150, seed=0):
    """Two interleaved noisy spiral arms of 1.5 turns: (2n, 2) float32 points, (2n,) int64 labels."""
    rng = np.random.default_rng(seed)
    t = np.linspace(0.1, 1.0, n_per_class)
    xs, ys = [], []
    for c in range(2):
        angle = 3 * np.pi * t + c * np.pi
        xs.append(np.stack([t * np.cos(angle), t * np.sin(angle)], axis=1) + rng.normal(0, 0.02, (n_per_class, 2)))
        ys.append(np.full(n_per_class, c))
    return np.concatenate(xs).astype(np.float32), np.concatenate(ys)


def patterns(n=256, seed=0):
    """(n, 1, 8, 8) noisy images of a vertical bar, a horizontal bar, a box or a diagonal, shifted by up to 1 px."""
    rng = np.random.default_rng(seed)
    base = np.zeros((4, 8, 8), np.float32)
    base[0, :, 3:5] = 1
    base[1, 3:5, :] = 1
    base[2, 1:7, 1] = base[2, 1:7, 6] = base[2, 1, 1:7] = base[2, 6, 1:7] = 1
    base[3] = np.eye(8)
    labels = rng.integers(0, 4, n)
    shifts = rng.integers(-1, 2, (n, 2))
    images = np.stack([np.roll(base[k], tuple(s), axis=(0, 1)) for k, s in zip(labels, shifts)])
    images += rng.normal(0, 0.3, images.shape)
    return images[:, None].astype(np.float32), labels


def fit(model, x, y, steps, lr):
    """Full-batch SGD with momentum on cross-entropy; returns the final training accuracy."""
    opt = dt.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    xt, yt = dt.tensor(x), dt.tensor(y)
    for _ in range(steps):
        loss = F.cross_entropy(model(xt), yt)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with dt.no_grad():
        return float((model(xt).numpy().argmax(axis=1) == y).mean())


def test_mlp_fits_two_spirals():
    dt.manual_seed(0)
    x, y = two_spirals()
    mlp = nn.Sequential(nn.Linear(2, 64), nn.Tanh(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2))
    assert fit(mlp, x, y, steps=800, lr=0.1) >= 0.99


def test_cnn_fits_8x8_patterns():
    dt.manual_seed(0)
    x, y = patterns()
    cnn = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                        nn.Linear(8 * 4 * 4, 4))
    assert fit(cnn, x, y, steps=60, lr=0.05) >= 0.99
