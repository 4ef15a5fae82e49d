"""The ptb_small training step with OpenBLAS's parallel jobs on disttrain's team against OpenBLAS's own
threads, in scripts that import NumPy first and in scripts that import disttrain first.

Whose threads run the BLAS is a process-wide choice ($DISTTRAIN_BLAS_THREADS), and so is the idle wait of
OpenBLAS's own (OPENBLAS_THREAD_TIMEOUT, which `import disttrain` shortens only when NumPy is not loaded
yet), so each side is a child process; the children alternate, round after round, and the parent prints
the median step time of each and the ratio. Two threads, wall time.
"""
import argparse
import os
import statistics
import subprocess
import sys

CHILD = """
import sys, time, itertools
{first}
sys.path.insert(0, {benchmarks!r})
import bench_lm_speed as B
import disttrain as dt
from disttrain.kernels_cpu import native
from disttrain.train import Trainer, load_job
dt.set_num_threads(2)
spec = load_job({job!r}, [])
trainer = Trainer.from_job(spec, progress=False)
segments = list(itertools.islice(iter(trainer.train_iter), {steps}))
run = B.nn_api_runner(spec, trainer.data.vocab_size, segments)
run()
start = time.perf_counter()
run()
print(native.blas_jobs_on_our_threads(), (time.perf_counter() - start) / {steps})
"""

SIDES = {"disttrain's team": "disttrain", "OpenBLAS's threads": "openblas"}
ORDERS = {"NumPy imported first": "import numpy", "disttrain imported first": "import disttrain"}


def step_seconds(first, threads, job, steps):
    code = CHILD.format(first=first, benchmarks=os.path.dirname(os.path.abspath(__file__)), job=job, steps=steps)
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    env["DISTTRAIN_BLAS_THREADS"] = threads
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900,
                          check=True)
    on_team, seconds = done.stdout.split()
    if (on_team == "True") != (threads == "disttrain"):
        raise SystemExit(f"DISTTRAIN_BLAS_THREADS={threads}, but the child says jobs on the team: {on_team}")
    return float(seconds)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", default="jobs/ptb_small.toml")
    parser.add_argument("--steps", type=int, default=20, help="TBPTT segments timed per child")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    times = {(order, side): [] for order in ORDERS for side in SIDES}
    for _ in range(args.rounds):
        for order, first in ORDERS.items():
            for side, threads in SIDES.items():
                times[order, side].append(step_seconds(first, threads, args.job, args.steps))
    print(f"{args.job}, nn-API training step on 2 threads (wall), median of {args.rounds} children of "
          f"{args.steps} steps each; load average (1 min) {load_before:.2f} before, {os.getloadavg()[0]:.2f} after")
    for order in ORDERS:
        team, own = (statistics.median(times[order, side]) for side in SIDES)
        print(f"  {order:25s} disttrain's team {team * 1e3:6.2f} ms   OpenBLAS's threads {own * 1e3:6.2f} ms"
              f"   team {own / team:.2f}x as fast")


if __name__ == "__main__":
    main()
