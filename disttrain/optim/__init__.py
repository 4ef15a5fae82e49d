"""disttrain.optim: optimizers (SGD, Adam, AdamW) and learning-rate schedules, shaped like torch.optim.

    opt = dt.optim.SGD(model.parameters(), lr=1.0)
    sched = dt.optim.EpochDecayLR(opt, decay_after_epoch=4, decay=0.5)
    loss.backward(); opt.step(); opt.zero_grad()      # per batch
    sched.step()                                      # per epoch
"""
from disttrain.optim import lr_scheduler
from disttrain.optim.adam import Adam, AdamW
from disttrain.optim.lr_scheduler import (CosineAnnealingLR, EpochDecayLR, ExponentialLR, LambdaLR, LinearLR,
                                          LinearWarmup, LRScheduler, MultiStepLR, SequentialLR, StepLR)
from disttrain.optim.optimizer import Optimizer
from disttrain.optim.sgd import SGD

__all__ = ["Optimizer", "SGD", "Adam", "AdamW", "lr_scheduler", "LRScheduler", "LambdaLR", "StepLR", "MultiStepLR",
           "ExponentialLR", "CosineAnnealingLR", "LinearLR", "LinearWarmup", "EpochDecayLR", "SequentialLR"]
