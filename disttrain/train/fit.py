"""fit(): the training loop for your own model and data, from Python, in any mode.

    import disttrain as dt
    from disttrain.data.source import ArrayData

    data = ArrayData(x, y, batch_size=64, eval={"valid": (xv, yv)})
    trainer = dt.train.fit(model, data, dt.optim.Adam(model.parameters(), lr=1e-3),
                           mode="data", epochs=5, clip_norm=1.0, out_dir="runs/mine")
    trainer.evals["valid"].loss

Under `mpiexec -n N python script.py` with mode="data" every rank runs this same call on its share of every
batch; mode="pipeline" cuts the model along its blocks (stages=K). The keyword settings are the job keys of
[train], [optim] (clip_norm, loss), [memory] and [parallel] by name (`epochs`, `max_steps`, `log_every`,
`eval_every`, `checkpoint_every`, `stages`, `micro_batches`, `bucket_mb`, ...), checked as a job file's are;
the other [optim] keys (lr, momentum, ...) belong to the optimizer given, and passing one is a TypeError.
A Mode object may be given instead of a name. Resuming: `fit(..., out_dir=d, resume=True)`. The run's
config.toml holds these settings only.
"""
import json
import sys

from disttrain.train import saving
from disttrain.train.jobspec import SCHEMA, JobSpecError, loads_job
from disttrain.train.loop import APPLIED_SETTINGS, Trainer
from disttrain.train.mode import Mode

__all__ = ["fit", "settings_spec"]


def fit(model, data, optimizer, mode="local", out_dir=None, schedules=None, resume=False, overwrite=False,
        progress=None, **settings):
    """Train and evaluate; returns the Trainer (its `evals`, `step`, `model`, ...)."""
    mode_name = mode if isinstance(mode, str) else "local"
    if mode_name == "ps":
        raise JobSpecError('fit(): mode="ps" is not a mode fit() runs: a parameter-server job runs servers and '
                           "workers as processes of their own; give your model and data to a job file ([model] "
                           "factory, [data] factory) and start it with `disttrain ps-cluster JOB.toml`")
    spec = settings_spec(settings, mode=mode_name)
    if not isinstance(mode, Mode):
        from disttrain.parallel.mpi_job import agree_on_setup, mode_for     # parallel sits above train

        differing = agree_on_setup(None, job=spec.to_dict())   # ranks given other settings would train apart
        if differing:
            raise JobSpecError("; ".join(f"fit(): rank {rank}: {text}" for rank, (_, text) in differing))
        mode = mode_for(spec, command=f"python {_script()}")
    trainer = Trainer(model, data, optimizer, spec=spec, mode=mode, schedules=schedules, out_dir=out_dir,
                      progress=progress, overwrite=overwrite)
    if resume:
        _resume(trainer, out_dir)
    try:
        trainer.fit()
    except saving.RunExistsError as exc:         # its advice names the command line's flags
        raise saving.RunExistsError(f"{exc} (from Python: fit(..., resume=True) or fit(..., overwrite=True))"
                                    ) from None
    finally:
        mode.close()
    return trainer


def _script():
    """The script this process runs (what each rank must run), as the user would type it."""
    script = sys.argv[0] if sys.argv and sys.argv[0] else ""
    return script if script.endswith(".py") else "your_script.py"


def _resume(trainer, out_dir):
    """Restore the newest checkpoint in out_dir and say so, and what the settings changed, as `disttrain run
    --resume` does."""
    checkpoint = saving.load_checkpoint(out_dir)
    trainer.restore(checkpoint)
    if trainer.mode.is_main:
        for line in checkpoint.skipped + trainer.resume_changes:
            print(f"fit(): {line}", flush=True)
        print(f"fit(): resuming from {checkpoint.path} {trainer.resume_point()}", flush=True)


def settings_spec(settings, mode="local"):
    """A JobSpec holding `settings` ({key: value}, keys of [train], [optim], [memory] or [parallel]), checked
    like a job file; JobSpecError names a bad value, TypeError an unknown key."""
    overrides = [f"parallel.mode={json.dumps(mode)}"]
    for key, value in settings.items():
        section = next((s for s in APPLIED_SETTINGS if key in _applied_keys(s)), None)
        if section is None:
            known = sorted({k for s in APPLIED_SETTINGS for k in _applied_keys(s)} - {"mode"})
            elsewhere = [s for s in SCHEMA if any(f.name == key for f in SCHEMA[s])]
            why = (f"[{elsewhere[0]}] {key} describes what fit() is given (set it on the optimizer, model or data "
                   f"itself, or an LR schedule: schedules=)" if elsewhere else f"unknown setting {key!r}")
            raise TypeError(f"fit() got {key}={value!r}: {why}; fit()'s settings: {', '.join(known)}")
        if value is not None:
            overrides.append(f"{section}.{key}={json.dumps(value)}")
    return loads_job("", overrides, source="fit()")


def _applied_keys(section):
    keys = APPLIED_SETTINGS[section]
    return keys if keys is not None else [f.name for f in SCHEMA[section]]
