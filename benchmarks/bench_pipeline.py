"""Pipeline efficiency: a K-stage pipelined step against K x the one-process step, for several micro-batch counts.

    mpiexec -n 2 .venv/bin/python benchmarks/bench_pipeline.py [--micro 1,2,4,8] [--schedule 1f1b]
            [--trace benchmarks/out/pipeline.trace.json --png benchmarks/out/pipeline_timeline.png]

Model: an MLP of K x `--layers` blocks Linear(width, width) + tanh (float32), cut into K equal stages, one per
rank, with a cross-entropy loss over `width` classes on the last stage; a batch of `--batch` rows. Per round,
interleaved so that load from other processes hits both alike, each after a barrier:
  single     rank 0 runs forward + backward of the whole model on the whole batch (the others wait)
  pipe M     every rank runs its stage's schedule over M micro-batches of batch / M rows, once per StageLink
             progress variant ("thread": a thread keeps MPI moving the messages in flight; "none")
Reported (medians over rounds):
  efficiency = pipe throughput / (single throughput x K), against the theory M / (M + K - 1) of equal stages
               with free communication; target: efficiency >= 0.85 x theory
  bubble     = 1 - (forward + backward span time) / step time, per rank from the trace spans, mean over ranks
               (the theory's bubble is (K - 1) / (M + K - 1))
  slowdown   = the busiest stage's forward + backward seconds / (single step seconds / K): how much slower the
               stages compute in the pipeline than their share of the one-process step (micro-batch GEMMs,
               per-micro-batch Python overhead, and cores shared with the other ranks and processes)
The trace file (Chrome JSON) and the PNG timeline show one pipelined step at the largest M.
"""
import argparse
import os
import statistics
import sys

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")   # one core per rank: set before NumPy loads BLAS
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

import disttrain as dt  # noqa: E402
from disttrain import nn, trace  # noqa: E402
from disttrain.nn import functional as F  # noqa: E402
from disttrain.parallel import world  # noqa: E402
from disttrain.parallel.pipeline import Stage, blocks_of  # noqa: E402
from disttrain.parallel.pipeline.p2p import StageLink  # noqa: E402
from disttrain.parallel.pipeline.runtime import PipelineRuntime  # noqa: E402
from harness import machine  # noqa: E402

COMPUTE = ("forward", "backward")


def build(blocks, width):
    dt.manual_seed(0)
    mods = []
    for _ in range(blocks):
        mods.append(nn.Sequential(nn.Linear(width, width), nn.Tanh()))
    return nn.Sequential(*mods)


def loss_fn(output, targets):
    return F.cross_entropy(output, dt.tensor(targets))


def timed(comm, fn):
    """Seconds of fn() between two barriers (as every rank sees them)."""
    comm.Barrier()
    start = trace.now()
    fn()
    comm.Barrier()
    return trace.now() - start


def single_step(comm, model, x, y):
    if comm.rank == 0:
        model.zero_grad()
        loss_fn(model(dt.tensor(x)), y).backward()


def pipe_step(runtime, stage, x, y):
    stage.zero_grad()
    runtime.step(x, y, loss_fn)


def bubble_of(comm, tracer, seconds):
    """(1 - compute span time / step time averaged over ranks, the busiest rank's compute seconds)."""
    busy = sum(end - begin for name, _, begin, end, _ in tracer.spans if name in COMPUTE)
    idle = np.array([1.0 - busy / seconds])
    comm.Allreduce(idle)
    busiest = comm.Allreduce(np.array([busy]), op="max")
    return float(idle[0]) / comm.size, float(busiest[0])


def measure(args, comm, model, stage, links, x, y):
    """Median step seconds of "single" and of every (progress variant, M), and median bubbles."""
    runtimes = {(variant, m): PipelineRuntime(stage, link, schedule=args.schedule, micro_batches=m, batch_axis=0)
                for variant, link in links.items() for m in args.micro}
    times = {key: [] for key in ["single", *runtimes]}
    bubbles = {key: [] for key in runtimes}
    busiest = {key: [] for key in runtimes}
    for r in range(args.warmup + args.rounds):
        seconds = timed(comm, lambda: single_step(comm, model, x, y))
        if r >= args.warmup:
            times["single"].append(seconds)
        for key, runtime in runtimes.items():
            tracer = trace.Tracer(rank=comm.rank)
            with trace.tracing(tracer):
                seconds = timed(comm, lambda: pipe_step(runtime, stage, x, y))
            bubble, busy = bubble_of(comm, tracer, seconds)
            if r >= args.warmup:
                times[key].append(seconds)
                bubbles[key].append(bubble)
                busiest[key].append(busy)
    median = lambda table: {k: statistics.median(v) for k, v in table.items()}     # noqa: E731
    return median(times), median(bubbles), median(busiest)


def write_trace(args, comm, stage, link, x, y):
    """One pipelined step at the largest M, as a Chrome trace and (rank 0) a PNG timeline."""
    runtime = PipelineRuntime(stage, link, schedule=args.schedule, micro_batches=max(args.micro), batch_axis=0)
    tracer = trace.Tracer(rank=comm.rank)
    tracer.start(comm)
    with trace.tracing(tracer):
        pipe_step(runtime, stage, x, y)
    written = tracer.write(args.trace, comm)
    if written is not None and args.png:
        plot_timeline(written, args.png, f"{comm.size} stages, {args.schedule}, M = {max(args.micro)}")


def plot_timeline(trace_path, png, title):
    import json

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    events = [e for e in json.loads(open(trace_path).read())["traceEvents"] if e["ph"] == "X"]
    colors = {"forward": "tab:blue", "backward": "tab:orange"}
    ranks = sorted({e["pid"] for e in events})
    fig, ax = plt.subplots(figsize=(10, 0.8 + 0.7 * len(ranks)))
    for e in events:
        row = e["pid"] + (0.0 if e["name"] in colors else 0.4)
        ax.broken_barh([(e["ts"] / 1e3, e["dur"] / 1e3)], (row - 0.15, 0.3 if e["name"] in colors else 0.15),
                       color=colors.get(e["name"], "tab:gray"))
        if e["name"] in colors and "micro_batch" in e.get("args", {}):
            ax.text((e["ts"] + e["dur"] / 2) / 1e3, row, str(e["args"]["micro_batch"]), ha="center", va="center",
                    fontsize=6, color="white")
    ax.set_yticks(ranks, [f"stage {r}" for r in ranks])
    ax.invert_yaxis()
    ax.set_xlabel("ms (blue: forward, orange: backward, gray: send/recv/wait; numbers: micro-batch)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--layers", type=int, default=4, help="Linear+tanh blocks per stage")
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--micro", default="1,2,4,8")
    parser.add_argument("--schedule", default="1f1b", choices=["1f1b", "gpipe"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--progress", default="none,thread",
                        help="StageLink progress variants measured side by side (the first is traced)")
    parser.add_argument("--trace", default=None)
    parser.add_argument("--png", default=None)
    args = parser.parse_args()
    args.micro = [int(m) for m in args.micro.split(",")]
    args.progress = args.progress.split(",")

    comm = world()
    k = comm.size
    model = build(k * args.layers, args.width)
    blocks = blocks_of(model)
    stage = Stage(blocks[comm.rank * args.layers:(comm.rank + 1) * args.layers])
    links = {variant: StageLink(comm.Dup(), comm.rank, k, progress=variant) for variant in args.progress}
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch, args.width)).astype(np.float32)
    y = rng.integers(0, args.width, args.batch)

    times, bubbles, busiest = measure(args, comm, model, stage, links, x, y)
    if args.trace:
        write_trace(args, comm, stage, links[args.progress[0]], x, y)
    if comm.rank != 0:
        return
    single = args.batch / times["single"]
    print(f"# {machine()}; {k} ranks (stages), {args.schedule}, MLP {k}x{args.layers} x Linear({args.width}) + "
          f"tanh, batch {args.batch}, float32, medians of {args.rounds} interleaved rounds")
    print(f"single process: {single:,.0f} rows/s (x K = {single * k:,.0f})")
    print(f"{'progress':>8} {'M':>4} {'rows/s':>10} {'efficiency':>10} {'theory':>7} {'eff/theory':>10} "
          f"{'bubble':>7} {'theory':>7} {'slowdown':>8}  target eff/theory >= 0.85")
    for variant, m in bubbles:
        rate = args.batch / times[variant, m]
        efficiency, theory = rate / (single * k), m / (m + k - 1)
        print(f"{variant:>8} {m:>4} {rate:>10,.0f} {efficiency:>10.3f} {theory:>7.3f} {efficiency / theory:>10.3f} "
              f"{bubbles[variant, m]:>7.3f} {(k - 1) / (m + k - 1):>7.3f} "
              f"{busiest[variant, m] / (times['single'] / k):>8.2f}  "
              f"{'ok' if efficiency >= 0.85 * theory else 'MISS'}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
