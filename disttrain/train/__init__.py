"""disttrain.train: the one training loop every mode uses (job spec -> model, data, optimizer, mode).

    spec = load_job("jobs/charlm.toml", overrides=["train.epochs=2"])
    trainer = Trainer(spec, out_dir="runs/charlm")
    trainer.fit()            # metrics.jsonl, config.toml, curves.png, checkpoints/ in out_dir

Modules: jobspec (TOML job files), build (spec -> corpus, model, optimizer, schedules), loop (Trainer),
strategy (the seam for distributed modes), metrics (metrics.jsonl, curves.png), checkpoint (atomic, verified
job checkpoints), resume (which job changes a checkpoint tolerates), progress (tqdm bar or log lines).
"""
from disttrain.train.checkpoint import CheckpointError, load_checkpoint
from disttrain.train.jobspec import JobSpec, JobSpecError, load_job
from disttrain.train.loop import EvalResult, Trainer, TrainingDiverged, TrainingInterrupted

__all__ = ["CheckpointError", "EvalResult", "JobSpec", "JobSpecError", "Trainer", "TrainingDiverged",
           "TrainingInterrupted", "load_checkpoint", "load_job"]
