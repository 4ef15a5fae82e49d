"""Training throughput of a job on N data-parallel ranks vs one process with the same global batch.

    .venv/bin/python benchmarks/bench_dp_throughput.py [--job jobs/ptb_small.toml] [--steps 50]
    mpiexec -n 2 .venv/bin/python benchmarks/bench_dp_throughput.py [--job jobs/ptb_small.toml] [--steps 50]

Runs the Trainer's own train_step over the job's first `--steps` TBPTT segments (after `--warmup` untimed
ones): with one process under LocalStrategy, with several under DataParallelMode (each rank B/N of the
streams). Prints global tokens/s and the global training loss (mean over ranks) every 10 steps, so two runs
can be compared: the loss curves must agree (to float32 rounding) and the throughput ratio is the scaling.
"""
import argparse
import os
import sys
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")   # set before NumPy loads BLAS: one core per rank
os.environ.setdefault("OMP_NUM_THREADS", "1")

from harness import machine  # noqa: E402

from disttrain.parallel import DataParallelMode  # noqa: E402
from disttrain.parallel.mpi_job import launched_size  # noqa: E402
from disttrain.train import Trainer, load_job  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", default="jobs/ptb_small.toml")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--overlap", choices=("true", "false", "auto"), default=None,
                        help="reduce the gradient buckets during backward, after it, or pick by timing "
                             "(default: the job's [parallel] overlap)")
    parser.add_argument("--no-overlap", dest="overlap", action="store_const", const="false", help="= --overlap false")
    args = parser.parse_args()
    spec = load_job(args.job, args.overrides)
    overlap = {"true": True, "false": False, "auto": "auto", None: spec.parallel.overlap}[args.overlap]
    mode = DataParallelMode(bucket_mb=spec.parallel.bucket_mb, overlap=overlap) if launched_size() > 1 else None
    trainer = Trainer.from_job(spec, mode=mode, progress=False)
    s = trainer.mode
    segments = iter(trainer.train_iter)
    losses, tokens, notes = [], 0, []
    for k in range(args.warmup + args.steps):
        if k == args.warmup:
            s.barrier()
            start = time.perf_counter()
        inputs, targets = next(segments)
        loss, _ = trainer.train_step(inputs, targets)
        losses.append(s.reduce([loss], "mean")[0])
        if k >= args.warmup:
            tokens += targets.size * s.world_size
        notes += s.messages()
    s.barrier()
    seconds = time.perf_counter() - start
    if not s.is_main:
        return 0
    print(f"# {machine()}")
    print(f"# {args.job} (batch {spec.data.batch_size} global, bptt {spec.data.bptt}, {spec.model.layers}x"
          f"{spec.model.hidden} LSTM, {sum(p.numel() for p in trainer.params):,} parameters); {s.world_size} "
          f"rank(s) ({s.name}" + (f", bucket_mb {spec.parallel.bucket_mb:g}, overlap {overlap}"
                                  if mode else "") + f"), {args.steps} timed steps after {args.warmup}")
    print("global train loss every 10 steps: " + " ".join(f"{loss:.5f}" for loss in losses[::10]))
    print(f"throughput: {tokens / seconds:,.0f} tokens/s ({seconds / args.steps * 1e3:.1f} ms/step)")
    for line in notes:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
