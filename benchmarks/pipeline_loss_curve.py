"""The first N training losses of a job, in its own mode (under mpiexec) or locally, for comparing curves.

    mpiexec -n 2 .venv/bin/python benchmarks/pipeline_loss_curve.py jobs/ptb_small_pipeline.toml 60 pp.json
    .venv/bin/python benchmarks/pipeline_loss_curve.py jobs/ptb_small_pipeline.toml 60 local.json --mode local
    mpiexec -n 2 .venv/bin/python benchmarks/pipeline_loss_curve.py jobs/ptb_small_pipeline.toml 60 dp.json --mode data
    .venv/bin/python benchmarks/pipeline_loss_curve.py --compare pp.json local.json

Losses are the Trainer's per-step train losses (the global batch's token mean), written by rank 0 as JSON.
"""
import argparse
import json

import numpy as np


def record(job, steps, out, mode):
    from disttrain.parallel.mpi_job import mode_for
    from disttrain.train import Trainer
    from disttrain.train.jobspec import load_job

    spec = load_job(job, [f"parallel.mode={mode}"] if mode else [])
    trainer = Trainer.from_job(spec, mode=mode_for(spec), progress=False)
    losses = []
    for inputs, targets in trainer.train_iter:
        losses.append(trainer.train_step(inputs, targets)[0])
        if len(losses) == steps:
            break
    if trainer.mode.is_main:
        with open(out, "w") as fh:
            json.dump(losses, fh)


def compare(a_path, b_path):
    a, b = (np.array(json.load(open(p))) for p in (a_path, b_path))
    rel = np.abs(a - b) / np.abs(b)
    print(f"{len(a)} steps; relative difference per step: " + " ".join(f"{x:.0e}" for x in rel))
    print(f"first step above 1e-6: {int(np.argmax(rel > 1e-6)) + 1 if (rel > 1e-6).any() else None}; "
          f"max {rel.max():.2e}; mean of the last 10 losses {a[-10:].mean():.4f} vs {b[-10:].mean():.4f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*")
    parser.add_argument("--mode", default=None, help="run the job in this [parallel] mode (default: the job's)")
    parser.add_argument("--compare", action="store_true", help="compare two recorded JSON files")
    args = parser.parse_args()
    if args.compare:
        compare(*args.paths)
    else:
        record(args.paths[0], int(args.paths[1]), args.paths[2], args.mode)
