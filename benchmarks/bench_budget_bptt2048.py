"""A char-level LM with a TBPTT window of 2048 trains with activation checkpointing inside a memory budget
that the same job without it exceeds (issue 4); prints both runs' peak figures and the budget.

Runs jobs/charlm_bptt2048.toml twice through the Trainer, the same job but for [memory]
activation_checkpointing:
- "none": the first training step is metered, needs more array memory than [memory] budget_mb, and the
  Trainer stops with MemoryBudgetExceeded (its message names the step's peak);
- "sqrt": trains to max_steps; the measured_peak_bytes of its memory.json (every step is metered with
  log_every = 1) stays under the budget.
Peaks are what [memory] budget_mb limits: a process's array bytes at a step's peak, parameters, gradients
and optimizer state included (docs/MEMORY.md).

    python benchmarks/bench_budget_bptt2048.py [--job jobs/charlm_bptt2048.toml] [--out runs/bptt2048]
"""
import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as the other benchmarks on the shared 2-core machine

from disttrain.train import Trainer, load_job  # noqa: E402
from disttrain.train.loop import MemoryBudgetExceeded  # noqa: E402
from disttrain.train.memory_plan import MEMORY_FILE  # noqa: E402

MIB = 2 ** 20


def run(job, mode, out_dir):
    """Train `job` with activation_checkpointing = mode into out_dir -> (peak bytes of the worst step or None,
    the MemoryBudgetExceeded message or None, seconds, steps taken)."""
    spec = load_job(job, overrides=[f'memory.activation_checkpointing="{mode}"'])
    trainer = Trainer.from_job(spec, out_dir=out_dir, progress=False, overwrite=True)    # a rerun replaces its own runs
    start = time.perf_counter()
    try:
        trainer.fit()
    except MemoryBudgetExceeded as exc:
        return trainer.measured_peak_bytes, str(exc), time.perf_counter() - start, trainer.step
    memory = json.loads((Path(out_dir) / MEMORY_FILE).read_text())
    return memory["measured_peak_bytes"], None, time.perf_counter() - start, trainer.step


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", default=str(Path(__file__).resolve().parent.parent / "jobs" / "charlm_bptt2048.toml"))
    parser.add_argument("--out", default=None, help="run directories go here (default: a temporary directory)")
    args = parser.parse_args()
    spec = load_job(args.job)
    budget = spec.memory.budget_mb
    print(f"{args.job}: bptt {spec.data.bptt}, batch {spec.data.batch_size}, hidden {spec.model.hidden}, "
          f"max_steps {spec.train.max_steps}; [memory] budget_mb = {budget:g}")
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(args.out or tmp)
        results = {mode: run(args.job, mode, base / mode) for mode in ("none", "sqrt")}
    for mode, (peak, error, seconds, steps) in results.items():
        verdict = f"FAILED after {steps} steps: {error}" if error else f"trained {steps} steps"
        print(f'  activation_checkpointing = "{mode}": peak {peak / MIB:.1f} MiB; {verdict} '
              f"({seconds:.1f} s)")
    (none_peak, none_error, _, _), (sqrt_peak, sqrt_error, _, _) = results["none"], results["sqrt"]
    print(f"peaks: none {none_peak / MIB:.1f} MiB > budget {budget:g} MiB > sqrt {sqrt_peak / MIB:.1f} MiB "
          f"(sqrt/none = {sqrt_peak / none_peak:.3f})")
    if none_error is None or sqrt_error is not None or sqrt_peak > budget * MIB:
        raise SystemExit("the budget does not separate the two runs as the job file says it should")


if __name__ == "__main__":
    main()
