"""Which job changes a checkpoint tolerates: for evaluation, and for a resumed run (`--resume --set ...`).

Evaluation needs only the weights, so only [model] and [data] must match the job the checkpoint was written for.
A resumed run continues the same optimisation, so every key must match except these, which change how long,
how often or how the same run is computed, or its step size:

    [optim]     lr (the base lr: the lr in use is scaled by new / old, so a warm-up's or a decay's factors so far
                carry over), clip_norm
    [train]     epochs, max_steps, eval_every, checkpoint_every, log_every, keep_checkpoints, keep_best,
                on_nonfinite, device
    [memory]    every key (activation checkpointing recomputes the same numbers; the budget is a check)
    [parallel]  every key (a run may resume on another number of processes, or in another mode)
    [ps]        every key

Any other difference is refused with CheckpointError "... was written for a different job; ..." naming each key.
"""
from disttrain.optim.lr_scheduler import scale_lr
from disttrain.train.jobspec import job_differences
from disttrain.train.saving import CheckpointError

__all__ = ["RESUMABLE_KEYS", "check_same_model", "resume_changes", "apply_lr_change"]

RESUMABLE_KEYS = {
    "optim": ("lr", "clip_norm"),
    "train": ("epochs", "max_steps", "eval_every", "checkpoint_every", "log_every", "keep_checkpoints", "keep_best",
              "on_nonfinite", "device"),
    "memory": None,            # None: every key of the section
    "parallel": None,
    "ps": None,
}
_MODEL_SECTIONS = ("model", "data")


def check_same_model(saved, job, where):
    """Raise CheckpointError when the checkpoint's job (`saved`, a to_dict()) has another [model] or [data]."""
    diffs = _differences(saved, job, lambda section, key: section not in _MODEL_SECTIONS)
    if diffs:
        raise CheckpointError(f"{where}: was written for a different job; " + "; ".join(_describe(d) for d in diffs))


def resume_changes(saved, job, where):
    """The (section, key, checkpoint's value, job's value) a resumed run may apply; raises CheckpointError naming
    every other difference."""
    changes = _differences(saved, job, lambda section, key: False)
    refused = [d for d in changes if not _resumable(d[0], d[1])]
    if refused:
        allowed = "; ".join(f"[{s}] " + ("every key" if keys is None else ", ".join(keys))
                            for s, keys in RESUMABLE_KEYS.items())
        raise CheckpointError(f"{where}: was written for a different job; "
                              + "; ".join(_describe(d) for d in refused)
                              + f" (a resumed run may change only: {allowed})")
    return changes


def apply_lr_change(optimizer, schedules, old_lr, new_lr):
    """Make new_lr the base lr of a restored optimizer and its schedules (see the module docstring); returns the
    lr in use before and after."""
    before = optimizer.param_groups[0]["lr"]
    scale_lr(optimizer, [s for s in (schedules.epoch, schedules.step) if s is not None], new_lr / old_lr)
    return before, optimizer.param_groups[0]["lr"]


def _resumable(section, key):
    keys = RESUMABLE_KEYS.get(section, ())
    return keys is None or key in keys


def _differences(saved, job, ignored):
    return [diff for diff in job_differences(saved, job) if not ignored(diff[0], diff[1])]


def _describe(diff):
    section, key, a, b = diff
    return f"[{section}] {key}: checkpoint {a!r}, job {b!r}"
