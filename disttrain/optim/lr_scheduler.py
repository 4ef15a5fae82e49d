"""Learning-rate schedules: each sets `group["lr"]` of an optimizer's param groups, one step at a time.

Torch's conventions, so schedules (and their sequences of lrs) match torch.optim.lr_scheduler:
- constructing a scheduler performs step 0: `last_epoch` becomes 0, each group's starting lr is
  kept as `group["initial_lr"]` (the scheduler's `base_lrs`) and the epoch-0 lr is set;
- `step()` advances `last_epoch` by one and sets the new lrs; call it after `optimizer.step()`,
  once per epoch or once per batch, whichever unit the schedule counts in;
- `get_lr()` is the chainable form: it derives the new lr from the group's *current* lr, so two
  schedulers on one optimizer (say a warm-up stepped per batch and a decay stepped per epoch)
  compose by multiplication; `_closed_form_lr()` gives the lr at `last_epoch` from `base_lrs`
  alone, used when SequentialLR switches to the next schedule.
Unlike torch there is no `last_epoch` constructor argument and no `step(epoch)`: a job resumes
with `load_state_dict` (construct the scheduler before loading the optimizer's state, since
construction sets the lrs).
"""
import copy
import math
from bisect import bisect_right
from collections import Counter

from disttrain.optim.optimizer import Optimizer


class LRScheduler:
    _not_saved = ("optimizer",)  # attributes state_dict leaves out

    def __init__(self, optimizer):
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"{type(self).__name__} needs an Optimizer, got {type(optimizer).__name__}")
        self.optimizer = optimizer
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])  # a second scheduler keeps the first one's base
        self.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
        self.last_epoch = -1
        self._initial_step()

    def get_lr(self):
        """The lrs for `last_epoch` (already advanced), derived from the groups' current lrs."""
        raise NotImplementedError

    def _closed_form_lr(self):
        """The lrs for `last_epoch` from `base_lrs` alone."""
        raise NotImplementedError

    def step(self):
        self.last_epoch += 1
        self._set_lrs(self.get_lr())

    def get_last_lr(self):
        """The lrs this scheduler set last, one per param group."""
        return list(self._last_lr)

    def scale_base_lrs(self, factor):
        """Multiply the base lrs (and the lrs last set) by `factor`; `scale_lr` also scales the optimizer's."""
        self.base_lrs = [lr * factor for lr in self.base_lrs]
        self._last_lr = [lr * factor for lr in self._last_lr]

    def state_dict(self):
        return copy.deepcopy({k: v for k, v in vars(self).items() if k not in self._not_saved})

    def load_state_dict(self, state_dict):
        self.__dict__.update(copy.deepcopy(state_dict))

    # ---- used by SequentialLR ----------------------------------------------------------------
    def _initial_step(self):
        self.step()

    def _restart(self):
        """Jump to epoch 0 of this schedule, starting from `base_lrs`."""
        self.last_epoch = 0
        self._set_lrs(self._closed_form_lr())

    def _set_lrs(self, lrs):
        for group, lr in zip(self.optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr
        self._last_lr = list(lrs)

    def _current_lrs(self):
        return [group["lr"] for group in self.optimizer.param_groups]


class LambdaLR(LRScheduler):
    """lr = base_lr * lr_lambda(last_epoch); one function for all groups or a list, one per group.

    The functions are code, not state: state_dict leaves them out, and the constructor supplies them.
    """

    _not_saved = ("optimizer", "lr_lambdas")

    def __init__(self, optimizer, lr_lambda):
        n = len(optimizer.param_groups)
        if isinstance(lr_lambda, (list, tuple)):
            if len(lr_lambda) != n:
                raise ValueError(f"LambdaLR: got {len(lr_lambda)} lr_lambdas for {n} param groups")
            self.lr_lambdas = list(lr_lambda)
        else:
            self.lr_lambdas = [lr_lambda] * n
        super().__init__(optimizer)

    def get_lr(self):
        return [base * fn(self.last_epoch) for fn, base in zip(self.lr_lambdas, self.base_lrs)]

    _closed_form_lr = get_lr


class StepLR(LRScheduler):
    """Multiply the lr by `gamma` every `step_size` epochs: lr = base_lr * gamma ** (epoch // step_size)."""

    def __init__(self, optimizer, step_size, gamma=0.1):
        if not (isinstance(step_size, int) and step_size >= 1):
            raise ValueError(f"StepLR: step_size must be an int >= 1, got {step_size!r}")
        self.step_size = step_size
        self.gamma = gamma
        super().__init__(optimizer)

    def get_lr(self):
        if self.last_epoch == 0 or self.last_epoch % self.step_size != 0:
            return self._current_lrs()
        return [lr * self.gamma for lr in self._current_lrs()]

    def _closed_form_lr(self):
        return [base * self.gamma ** (self.last_epoch // self.step_size) for base in self.base_lrs]


class MultiStepLR(LRScheduler):
    """Multiply the lr by `gamma` at each milestone epoch (a milestone listed twice decays twice)."""

    def __init__(self, optimizer, milestones, gamma=0.1):
        self.milestones = Counter(milestones)
        self.gamma = gamma
        super().__init__(optimizer)

    def get_lr(self):
        if self.last_epoch not in self.milestones:
            return self._current_lrs()
        factor = self.gamma ** self.milestones[self.last_epoch]
        return [lr * factor for lr in self._current_lrs()]

    def _closed_form_lr(self):
        passed = bisect_right(sorted(self.milestones.elements()), self.last_epoch)
        return [base * self.gamma ** passed for base in self.base_lrs]


class ExponentialLR(LRScheduler):
    """Multiply the lr by `gamma` every epoch: lr = base_lr * gamma ** epoch."""

    def __init__(self, optimizer, gamma):
        self.gamma = gamma
        super().__init__(optimizer)

    def get_lr(self):
        if self.last_epoch == 0:
            return self._current_lrs()
        return [lr * self.gamma for lr in self._current_lrs()]

    def _closed_form_lr(self):
        return [base * self.gamma ** self.last_epoch for base in self.base_lrs]


class CosineAnnealingLR(LRScheduler):
    """lr = eta_min + (base_lr - eta_min) * (1 + cos(pi * epoch / T_max)) / 2, continued past T_max.

    Computed recursively as torch does (so it chains with other schedulers); past T_max the cosine
    keeps going, climbing back to base_lr at 2 * T_max (no restarts).
    """

    def __init__(self, optimizer, T_max, eta_min=0.0):
        if not (isinstance(T_max, int) and T_max >= 1):
            raise ValueError(f"CosineAnnealingLR: T_max must be an int >= 1, got {T_max!r}")
        self.T_max = T_max
        self.eta_min = eta_min
        super().__init__(optimizer)

    def get_lr(self):
        epoch, T, eta_min = self.last_epoch, self.T_max, self.eta_min
        if epoch == 0:
            return self._current_lrs()
        if (epoch - 1 - T) % (2 * T) == 0:
            # at the trough the ratio below is 0/0: step up from the minimum by the first increment
            return [lr + (base - eta_min) * (1 - math.cos(math.pi / T)) / 2
                    for lr, base in zip(self._current_lrs(), self.base_lrs)]
        ratio = (1 + math.cos(math.pi * epoch / T)) / (1 + math.cos(math.pi * (epoch - 1) / T))
        return [ratio * (lr - eta_min) + eta_min for lr in self._current_lrs()]

    def _closed_form_lr(self):
        return [self.eta_min + (base - self.eta_min) * (1 + math.cos(math.pi * self.last_epoch / self.T_max)) / 2
                for base in self.base_lrs]


class LinearLR(LRScheduler):
    """Scale the lr by a factor going linearly from `start_factor` (epoch 0) to `end_factor`
    (epoch `total_iters`), then constant. The usual linear warm-up: stepped once per batch."""

    def __init__(self, optimizer, start_factor=1.0 / 3, end_factor=1.0, total_iters=5):
        if not 0 < start_factor <= 1:
            raise ValueError(f"LinearLR: start_factor must be in (0, 1], got {start_factor!r}")
        if not 0 <= end_factor <= 1:
            raise ValueError(f"LinearLR: end_factor must be in [0, 1], got {end_factor!r}")
        if not (isinstance(total_iters, int) and total_iters >= 1):
            raise ValueError(f"LinearLR: total_iters must be an int >= 1, got {total_iters!r}")
        self.start_factor = start_factor
        self.end_factor = end_factor
        self.total_iters = total_iters
        super().__init__(optimizer)

    def get_lr(self):
        if self.last_epoch == 0:
            return [lr * self.start_factor for lr in self._current_lrs()]
        if self.last_epoch > self.total_iters:
            return self._current_lrs()
        # ratio of this epoch's factor to the previous one's, so the update chains
        span = self.end_factor - self.start_factor
        ratio = 1.0 + span / (self.total_iters * self.start_factor + (self.last_epoch - 1) * span)
        return [lr * ratio for lr in self._current_lrs()]

    def _closed_form_lr(self):
        span = self.end_factor - self.start_factor
        factor = self.start_factor + span * min(self.total_iters, self.last_epoch) / self.total_iters
        return [base * factor for base in self.base_lrs]


LinearWarmup = LinearLR  # the name training code reads best with: LinearWarmup(opt, start_factor, 1.0, steps)


class EpochDecayLR(LRScheduler):
    """Zaremba et al. (2014)'s PTB LSTM schedule: constant lr, then times `decay` every further epoch.

    Epoch convention: epochs are numbered from 1 and `step()` is called once, at the end of each
    epoch. After construction (last_epoch == 0) the lr is epoch 1's; after k calls to step()
    (last_epoch == k) it is epoch k + 1's:

        lr(epoch e) = base_lr * decay ** max(0, e - decay_after_epoch)

    so epochs 1..decay_after_epoch run at base_lr and epoch decay_after_epoch + 1 at base_lr * decay.
    Zaremba "small": lr 1, decay 0.5 after epoch 4, 13 epochs -> 1, 1, 1, 1, 0.5, 0.25, ..., 0.5 ** 9.
    (Their code: lr * decay ** max(i + 1 - max_epoch, 0) with 0-based epoch i.) decay_after_epoch=0
    decays from epoch 1 on; a job that wants no decay uses decay=1 or no scheduler.
    """

    def __init__(self, optimizer, decay_after_epoch, decay):
        if not (isinstance(decay_after_epoch, int) and decay_after_epoch >= 0):
            raise ValueError(f"EpochDecayLR: decay_after_epoch must be an int >= 0, got {decay_after_epoch!r}")
        if not 0 < decay <= 1:
            raise ValueError(f"EpochDecayLR: decay must be in (0, 1], got {decay!r}")
        self.decay_after_epoch = decay_after_epoch
        self.decay = decay
        super().__init__(optimizer)

    def get_lr(self):
        if self.last_epoch + 1 > self.decay_after_epoch:
            return [lr * self.decay for lr in self._current_lrs()]
        return self._current_lrs()

    def _closed_form_lr(self):
        factor = self.decay ** max(0, self.last_epoch + 1 - self.decay_after_epoch)
        return [base * factor for base in self.base_lrs]


class SequentialLR(LRScheduler):
    """Run `schedulers` one after another, switching to schedulers[i + 1] at epoch milestones[i].

    The schedulers must be built on the same optimizer just before this one (each one's
    construction set the lrs; this undoes that and starts the first afresh). At a milestone the
    next schedule starts at its own epoch 0 from the base lrs, as in torch.
    """

    _not_saved = ("optimizer", "_schedulers")

    def __init__(self, optimizer, schedulers, milestones):
        _check_sequence(optimizer, schedulers, milestones)
        self.optimizer = optimizer
        self._schedulers = list(schedulers)
        self._milestones = list(milestones)
        self.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
        self.last_epoch = 0
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"]
        for scheduler in self._schedulers:
            scheduler.last_epoch -= 1  # so each one's next step is its epoch 0 again
        first = self._schedulers[bisect_right(self._milestones, 0)]
        first._initial_step()
        self._last_lr = first.get_last_lr()

    def step(self):
        self.last_epoch += 1
        index = bisect_right(self._milestones, self.last_epoch)
        scheduler = self._schedulers[index]
        if index > 0 and self._milestones[index - 1] == self.last_epoch:
            scheduler._restart()
        else:
            scheduler.step()
        self._last_lr = scheduler.get_last_lr()

    def scale_base_lrs(self, factor):
        super().scale_base_lrs(factor)
        for scheduler in self._schedulers:
            scheduler.scale_base_lrs(factor)

    def state_dict(self):
        state = super().state_dict()
        state["_schedulers"] = [s.state_dict() for s in self._schedulers]
        return state

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        for scheduler, saved in zip(self._schedulers, state_dict.pop("_schedulers"), strict=True):
            scheduler.load_state_dict(saved)
        super().load_state_dict(state_dict)


def scale_lr(optimizer, schedulers, factor):
    """Multiply a running optimizer's lr by `factor`, as if it had started from `factor` times its base lrs.

    Every group's current lr and initial_lr, and every scheduler's base lrs, are scaled. Chainable schedules
    derive each lr from the current one and closed forms from the base lrs, so both must move: then the factors
    applied so far (a warm-up, a decay) carry over and every later lr is `factor` times what it would have been.
    `schedulers`: all the schedulers driving the optimizer (each once).
    """
    for group in optimizer.param_groups:
        group["lr"] *= factor
        if "initial_lr" in group:
            group["initial_lr"] *= factor
    for scheduler in schedulers:
        scheduler.scale_base_lrs(factor)


def _check_sequence(optimizer, schedulers, milestones):
    if not schedulers:
        raise ValueError("SequentialLR needs at least one scheduler")
    for i, scheduler in enumerate(schedulers):
        if isinstance(scheduler, SequentialLR):
            raise TypeError(f"SequentialLR: schedulers[{i}] is a SequentialLR; nesting is not supported")
        if getattr(scheduler, "optimizer", None) is not optimizer:
            raise ValueError(f"SequentialLR: schedulers[{i}] ({type(scheduler).__name__}) drives a different optimizer")
    if len(milestones) != len(schedulers) - 1:
        raise ValueError(f"SequentialLR: {len(schedulers)} schedulers need {len(schedulers) - 1} milestones, "
                         f"got {len(milestones)}")
    if list(milestones) != sorted(milestones):
        raise ValueError(f"SequentialLR: milestones must be increasing, got {list(milestones)}")
