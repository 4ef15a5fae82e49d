"""A job's training step with freed memory retained (what `disttrain run` sets) vs glibc's default malloc.

    .venv/bin/python benchmarks/bench_host_allocator.py [--job jobs/ptb_small.toml] [--steps 20] [--rounds 5]

mallopt is process-wide, so each side runs in its own fresh process (rounds alternate between the two);
each process builds the job's Trainer, warms up on 3 segments, then times `Trainer.train_step` over the
job's first `--steps` TBPTT segments and reports ms per step and minor page faults per step.
The medians and the ratio are printed (disttrain.tensor.host_allocator explains the difference).
"""
import argparse
import json
import statistics
import subprocess
import sys

from harness import machine

_CHILD = """
import itertools, json, resource, sys, time
from disttrain.tensor.host_allocator import retain_freed_memory
from disttrain.train import Trainer, load_job

mode, job, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
if mode == "retained" and not retain_freed_memory({}):
    raise SystemExit("mallopt refused the settings (not glibc?)")
trainer = Trainer.from_job(load_job(job, []), progress=False)
segments = list(itertools.islice(iter(trainer.train_iter), steps))
for inputs, targets in segments[:3]:
    trainer.train_step(inputs, targets)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
start = time.perf_counter()
for inputs, targets in segments:
    trainer.train_step(inputs, targets)
elapsed = time.perf_counter() - start
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
print(json.dumps({"ms_per_step": elapsed / steps * 1e3, "faults_per_step": faults / steps}))
"""


def run_child(mode, job, steps):
    done = subprocess.run([sys.executable, "-c", _CHILD, mode, job, str(steps)], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"the {mode} run failed:\n{done.stderr}")
    return json.loads(done.stdout.splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", default="jobs/ptb_small.toml")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    results = {"system malloc": [], "retained": []}
    for _ in range(args.rounds):
        for mode in ("system", "retained"):
            results["retained" if mode == "retained" else "system malloc"].append(run_child(mode, args.job, args.steps))
    print(f"training step of {args.job}, {args.steps} steps per process, {args.rounds} processes each; {machine()}")
    medians = {}
    for name, runs in results.items():
        medians[name] = statistics.median(r["ms_per_step"] for r in runs)
        faults = statistics.median(r["faults_per_step"] for r in runs)
        print(f"  {name:14s} {medians[name]:7.1f} ms/step  {faults:8.0f} page faults/step")
    print(f"  speed-up retained / system malloc = {medians['system malloc'] / medians['retained']:.2f}x")


if __name__ == "__main__":
    main()
