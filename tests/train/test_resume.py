"""Resume == uninterrupted: a run continued from its checkpoint repeats the same steps bit for bit (CPU, float32)."""
import json

import numpy as np
import pytest

from disttrain.train import CheckpointError, Trainer, TrainingInterrupted, load_checkpoint

TIMING = ("time", "tokens_per_s", "peak_mem_bytes")  # measurements of the process, not results


def rows_of(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


class Crash(Exception):
    pass


def crash_after(trainer, step):
    """Make the trainer die (like a killed process: no cleanup, no checkpoint) right after `step`."""
    real = trainer.train_step

    def train_step(inputs, targets):
        out = real(inputs, targets)
        if trainer.step == step:
            raise Crash(step)
        return out

    trainer.train_step = train_step


# dropout draws random masks (RNG state), SGD momentum and Adam keep buffers, warm-up and decay move the lr,
# and 2 epochs cross an epoch boundary (state reset, schedule step, valid evaluation)
JOBS = {
    "adam+dropout": dict(overrides=("optim.warmup_steps=5", "train.eval_every=30"), layers=2, dropout=0.3,
                         optim="adam", lr=0.01, epochs=2),
    "adam+dropout+sqrt checkpointing": dict(overrides=("memory.activation_checkpointing=sqrt",), layers=2,
                                            dropout=0.3, optim="adam", lr=0.01, epochs=2),
    "sgd+momentum+decay": dict(overrides=("optim.momentum=0.9", "optim.decay_after_epoch=1", "optim.decay=0.5"),
                               layers=1, dropout=0.0, optim="sgd", lr=0.5, epochs=3),
}


@pytest.mark.parametrize("name", sorted(JOBS))
@pytest.mark.parametrize("crash_at", ["mid-epoch", "epoch-end"])
def test_resumed_run_repeats_the_uninterrupted_one_exactly(tiny_job, tmp_path, name, crash_at):
    job = JOBS[name]
    overrides = job["overrides"]
    kwargs = {k: v for k, v in job.items() if k != "overrides"}
    per_epoch = len(Trainer.from_job(tiny_job(*overrides, **kwargs), progress=False).train_iter)
    # the last checkpoint before the crash falls mid-epoch, or on the last step of the first epoch
    every = 5 if crash_at == "mid-epoch" else per_epoch
    ckpt_step = 2 * every if crash_at == "mid-epoch" else every
    spec = tiny_job(*overrides, f"train.checkpoint_every={every}", **kwargs)

    whole = Trainer.from_job(spec, out_dir=tmp_path / "whole", progress=False)
    whole.fit()
    assert 0 < ckpt_step < whole.step - 3

    broken = Trainer.from_job(spec, out_dir=tmp_path / "run", progress=False)
    crash_after(broken, ckpt_step + 3)
    with pytest.raises(Crash):
        broken.fit()
    assert load_checkpoint(tmp_path / "run").meta["step"] == ckpt_step

    resumed = Trainer.from_job(spec, out_dir=tmp_path / "run", progress=False)
    resumed.restore(load_checkpoint(tmp_path / "run"))
    assert resumed.step == ckpt_step
    resumed.fit()

    assert rows_of(tmp_path / "run") == rows_of(whole.out_dir)             # every loss, lr, grad norm, eval
    for (name_a, a), (name_b, b) in zip(whole.model.state_dict().items(), resumed.model.state_dict().items()):
        assert name_a == name_b
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_stop_request_checkpoints_and_resumes_exactly(tiny_job, tmp_path):
    spec = tiny_job(dropout=0.2, layers=2, epochs=2)
    whole = Trainer.from_job(spec, out_dir=tmp_path / "whole", progress=False)
    whole.fit()

    stopped = Trainer.from_job(spec, out_dir=tmp_path / "run", progress=False)
    real = stopped.train_step

    def train_step(inputs, targets):
        out = real(inputs, targets)
        if stopped.step == 13:
            stopped.request_stop("SIGTERM")       # what the CLI's signal handler does
        return out

    stopped.train_step = train_step
    with pytest.raises(TrainingInterrupted, match="SIGTERM after step 13"):
        stopped.fit()
    assert load_checkpoint(tmp_path / "run").meta["step"] == 13           # checkpoint_every = 0, still written

    resumed = Trainer.from_job(spec, out_dir=tmp_path / "run", progress=False)
    resumed.restore(load_checkpoint(tmp_path / "run"))
    resumed.fit()
    assert rows_of(tmp_path / "run") == rows_of(tmp_path / "whole")


def test_resuming_a_finished_run_changes_nothing_and_can_extend_it(tiny_job, tmp_path):
    spec = tiny_job("train.max_steps=12", epochs=3)
    Trainer.from_job(spec, out_dir=tmp_path, progress=False).fit()
    before = rows_of(tmp_path)
    again = Trainer.from_job(spec, out_dir=tmp_path, progress=False)
    again.restore(load_checkpoint(tmp_path))
    again.fit()
    assert rows_of(tmp_path) == before and again.step == 12

    longer = Trainer.from_job(tiny_job("train.max_steps=20", epochs=3), out_dir=tmp_path, progress=False)
    longer.restore(load_checkpoint(tmp_path))
    longer.fit()
    rows = rows_of(tmp_path)
    assert rows[:len(before)] == before and longer.step == 20
    assert [r["step"] for r in rows if r["split"] == "train"] == list(range(1, 21))


SCHEDULED = ("optim.warmup_steps=6", "optim.decay_after_epoch=1", "optim.decay=0.5", "optim.momentum=0.9")


@pytest.mark.parametrize("resume_at", ["in the warm-up", "after a decay"])
def test_a_new_lr_on_resume_takes_effect_through_the_schedules(tiny_job, tmp_path, resume_at):
    """--resume --set optim.lr=NEW: from the resumed step on, every lr is the one a run started with NEW has."""
    per_epoch = len(Trainer.from_job(tiny_job(*SCHEDULED, optim="sgd"), progress=False).train_iter)
    stop = 3 if resume_at == "in the warm-up" else per_epoch + 4
    total = 2 * per_epoch + 2                                             # into the third epoch: a second decay
    old = Trainer.from_job(tiny_job(*SCHEDULED, f"train.max_steps={stop}", optim="sgd", lr=0.5, epochs=3),
                  out_dir=tmp_path / "run", progress=False)
    old.fit()
    fresh = Trainer.from_job(tiny_job(*SCHEDULED, f"train.max_steps={total}", optim="sgd", lr=0.05, epochs=3),
                    out_dir=tmp_path / "fresh", progress=False)
    fresh.fit()

    resumed = Trainer.from_job(tiny_job(*SCHEDULED, f"train.max_steps={total}", optim="sgd", lr=0.05, epochs=3),
                      out_dir=tmp_path / "run", progress=False)
    resumed.restore(load_checkpoint(tmp_path / "run"))
    [change, steps] = resumed.resume_changes
    assert change.startswith("resumed with [optim] lr = 0.05 (the checkpoint's job: 0.5); the lr in use goes from")
    assert steps.startswith(f"resumed with [train] max_steps = {total} (the checkpoint's job: {stop})")
    resumed.fit()

    def lrs(run_dir):
        return {r["step"]: r["lr"] for r in rows_of(run_dir) if r["split"] == "train" and r["step"] > stop}
    got, want = lrs(tmp_path / "run"), lrs(tmp_path / "fresh")
    assert sorted(got) == list(range(stop + 1, total + 1))
    assert got == pytest.approx(want, rel=1e-12)
    assert len(set(got.values())) > 1                                     # the schedule keeps moving the lr
    assert 'lr = 0.05' in (tmp_path / "run" / "config.toml").read_text()   # the resumed job's actual settings


def test_resume_refuses_changes_other_than_the_resumable_keys(tiny_job, tmp_path):
    Trainer.from_job(tiny_job("train.max_steps=2"), out_dir=tmp_path, progress=False).fit()
    for change, described in [("optim.momentum=0.9", r"\[optim\] momentum: checkpoint 0.0, job 0.9"),
                              ("train.seed=4", r"\[train\] seed: checkpoint 3, job 4"),
                              ("optim.warmup_steps=3", r"\[optim\] warmup_steps: checkpoint 0, job 3")]:
        other = Trainer.from_job(tiny_job(change), progress=False)
        with pytest.raises(CheckpointError, match=rf"was written for a different job; {described} "
                                                  r"\(a resumed run may change only: \[optim\] lr, clip_norm;"):
            other.restore(load_checkpoint(tmp_path))
    allowed = Trainer.from_job(tiny_job("train.max_steps=4", "optim.clip_norm=0.5", "train.log_every=2",
                               "memory.activation_checkpointing=sqrt", "train.keep_checkpoints=3"), progress=False)
    allowed.restore(load_checkpoint(tmp_path))
    assert [line.split(" (")[0] for line in allowed.resume_changes] == [
        "resumed with [optim] clip_norm = 0.5", "resumed with [train] keep_checkpoints = 3",
        "resumed with [train] log_every = 2", "resumed with [train] max_steps = 4",
        "resumed with [memory] activation_checkpointing = 'sqrt'"]
