"""disttrain.train: the one training loop, for any model and data source, in every mode.

    spec = load_job("jobs/charlm.toml", overrides=["train.epochs=2"])
    trainer = Trainer.from_job(spec, out_dir="runs/charlm")
    trainer.fit()            # metrics.jsonl, config.toml, curves.png, checkpoints/ in out_dir

    trainer = fit(model, data, optimizer, mode="data", epochs=3)     # your own model and data, from Python

Modules: jobspec (TOML job files), families (the model families a job names by [model] kind: keys, build,
description, memory estimate), build (spec -> data, model, optimizer, schedules; factories), loop (Trainer),
mode (the mode interface, LocalMode), fit (the Python entry point), metrics (metrics.jsonl, curves.png), saving
(atomic, verified job checkpoints), resume (which job changes a checkpoint tolerates), progress (tqdm bar or
log lines), memory_plan (a job's memory estimate before it allocates), auto_checkpointing ([memory]
activation_checkpointing = "auto": the plan that fits budget_mb), cuda_graph (an LSTM LM's training step
captured as one CUDA graph, for one GPU).
"""
from disttrain.train.fit import fit
from disttrain.train.jobspec import JobSpec, JobSpecError, load_job
from disttrain.train.loop import EvalResult, Trainer, TrainingDiverged, TrainingInterrupted
from disttrain.train.mode import LocalMode, Mode
from disttrain.train.saving import CheckpointError, load_checkpoint

__all__ = ["CheckpointError", "EvalResult", "JobSpec", "JobSpecError", "LocalMode", "Mode", "Trainer",
           "TrainingDiverged", "TrainingInterrupted", "fit", "load_checkpoint", "load_job"]
