"""Every scheduler's lr sequence against torch.optim.lr_scheduler over 30 steps, two param groups."""
import numpy as np
import pytest

import disttrain as dt

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch

STEPS = 30
LRS = (0.1, 0.5)


def _lambda(epoch):
    return 1.0 / (epoch + 1)


SPECS = {
    "StepLR": lambda m, opt: [m.StepLR(opt, step_size=3, gamma=0.5)],
    "MultiStepLR": lambda m, opt: [m.MultiStepLR(opt, milestones=[2, 5, 5, 11], gamma=0.3)],
    "MultiStepLR-at-0": lambda m, opt: [m.MultiStepLR(opt, milestones=[0, 7], gamma=0.5)],
    "ExponentialLR": lambda m, opt: [m.ExponentialLR(opt, gamma=0.9)],
    "CosineAnnealingLR": lambda m, opt: [m.CosineAnnealingLR(opt, T_max=7, eta_min=0.01)],
    "CosineAnnealingLR-long": lambda m, opt: [m.CosineAnnealingLR(opt, T_max=40)],
    "LinearLR-warmup": lambda m, opt: [m.LinearLR(opt, start_factor=0.25, end_factor=1.0, total_iters=8)],
    "LinearLR-decay": lambda m, opt: [m.LinearLR(opt, start_factor=1.0, end_factor=0.1, total_iters=10)],
    "LambdaLR": lambda m, opt: [m.LambdaLR(opt, _lambda)],
    "LambdaLR-per-group": lambda m, opt: [m.LambdaLR(opt, [_lambda, lambda e: 0.95 ** e])],
    "SequentialLR-warmup-cosine": lambda m, opt: [m.SequentialLR(
        opt, [m.LinearLR(opt, start_factor=0.1, total_iters=5), m.CosineAnnealingLR(opt, T_max=20)],
        milestones=[5])],
    "SequentialLR-three": lambda m, opt: [m.SequentialLR(
        opt, [m.ExponentialLR(opt, gamma=0.9), m.StepLR(opt, step_size=3, gamma=0.5),
              m.LinearLR(opt, start_factor=0.5, total_iters=4)], milestones=[4, 12])],
    "chained-warmup-and-decay": lambda m, opt: [m.LinearLR(opt, start_factor=0.2, total_iters=6),
                                                m.ExponentialLR(opt, gamma=0.95)],
}


def _lr_sequence(module, optimizer, spec):
    schedulers = spec(module, optimizer)
    sequence = [[g["lr"] for g in optimizer.param_groups]]
    for _ in range(STEPS):
        optimizer.step()
        for s in schedulers:
            s.step()
        sequence.append(list(schedulers[-1].get_last_lr()))
        assert sequence[-1] == [g["lr"] for g in optimizer.param_groups]
    return sequence


@pytest.mark.parametrize("name", list(SPECS))
def test_lr_sequence_matches_torch(name):
    ours = dt.optim.SGD([{"params": [dt.zeros(1, requires_grad=True)], "lr": lr} for lr in LRS], lr=1.0)
    theirs = torch.optim.SGD([{"params": [torch.zeros(1, requires_grad=True)], "lr": lr} for lr in LRS], lr=1.0)
    expected = _lr_sequence(torch.optim.lr_scheduler, theirs, SPECS[name])
    got = _lr_sequence(dt.optim.lr_scheduler, ours, SPECS[name])
    np.testing.assert_allclose(np.array(got), np.array(expected), rtol=1e-12, atol=0)
