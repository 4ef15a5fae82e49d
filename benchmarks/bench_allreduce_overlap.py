"""Gradient synchronisation of DataParallel vs one raw mpi4py Allreduce, and how much of it backward hides.

    mpiexec -n 2 .venv/bin/python benchmarks/bench_allreduce_overlap.py [--trace overlap.trace.json]

Model: an MLP of `--layers` Linear(width, width) + tanh, float32, `--batch` examples per rank, so that
backward and the allreduce of all gradients take comparable time; one Linear layer per bucket. Four kinds of
step, interleaved step by step (so that load from other processes on the machine hits all of them alike),
each after a barrier, every DataParallel with sync="deferred" so that backward and the wait are measured apart:
  overlap/thread  backward with bucket allreduces started from the grad-ready callbacks, progress driven by
                  the callbacks and the polling thread (the default), then synchronize()
  overlap/hooks   the same with progress driven by the callbacks only
  after backward  DataParallel(overlap=False): the callbacks only pack, synchronize() reduces the buckets
                  one after another once backward is done; nothing to overlap
  raw             backward without communication, then `comm.Allreduce(MPI.IN_PLACE, buf)` of one buffer
                  holding the same number of bytes: the comparator
From the recorded timestamps:
  hidden  time during backward when some bucket allreduce was running (started on every rank, not done)
  wait    time from the end of the last rank's backward until synchronize() (or the raw Allreduce) returns:
          what the optimizer step waits for, less any wait for a slower rank
  sync bandwidth  = gradient bytes / (hidden + wait), against bytes / raw Allreduce time  (target >= 0.9)
  hidden fraction = hidden / (hidden + wait)                                              (target >= 0.7)
Medians over steps, per rank. The trace file holds the overlap/thread steps.
"""
import argparse
import contextlib
import os
import statistics
import sys

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")   # one core per rank: set before NumPy loads BLAS
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

import disttrain as dt  # noqa: E402
from disttrain import nn  # noqa: E402
from disttrain.parallel import DataParallel, trace, world  # noqa: E402
from harness import machine  # noqa: E402

RUNS = ("overlap/thread", "overlap/hooks", "after backward", "raw")


def build(layers, width):
    dt.manual_seed(0)
    mods = []
    for _ in range(layers):
        mods += [nn.Linear(width, width), nn.Tanh()]
    return nn.Sequential(*mods)


def union_before(spans, end):
    """Total length of the union of [start, stop) intervals, each clipped at `end`."""
    total, reach = 0.0, -float("inf")
    for start, stop in sorted((s, min(e, end)) for s, e in spans if s < end):
        if stop > reach:
            total += stop - max(start, reach)
            reach = stop
    return total


def step(run, dp, x, comm, raw_buf):
    """One step of kind `run`: (backward start, backward end, sync end, [(bucket start, completion)] or None)."""
    from mpi4py import MPI

    for p in dp.parameters():
        p.grad = None
    comm.Barrier()
    with trace.span("forward"):
        loss = (dp.module(x) ** 2).mean()
    with trace.span("backward"), dp.no_sync() if run == "raw" else contextlib.nullcontext():
        b0 = trace.now()
        loss.backward()
        b1 = trace.now()
    if run == "raw":
        comm.mpi_comm.Allreduce(MPI.IN_PLACE, raw_buf)
        return b0, b1, trace.now(), None
    dp.synchronize()
    return b0, b1, trace.now(), [(b.handle.started_at, b.handle.completed_at) for b in dp.reducer.buckets]


def summarise(rows, everywhere):
    """Medians over one kind of step of: backward, hidden, wait, and backward + wait on this rank.

    NOTE: communication can only run once every rank is there, so time spent waiting for a slower rank is
    load imbalance, not communication, and is left out: a bucket counts as running from the latest rank's
    start, and the wait from the moment the last rank's backward ended. (Ranks on one machine share
    time.perf_counter's clock, CLOCK_MONOTONIC.)
    """
    backward, hidden, wait, total = [], [], [], []
    for i, (b0, b1, w1, spans) in enumerate(rows):
        end = max(rank[i][0] for rank in everywhere)
        backward.append(b1 - b0)
        wait.append(max(0.0, w1 - end))
        total.append(w1 - b0)
        if spans is None:
            hidden.append(0.0)
            continue
        starts = [max(rank[i][1][k] for rank in everywhere) for k in range(len(spans))]
        hidden.append(union_before([(s, done) for s, (_, done) in zip(starts, spans)], end))
    return {name: statistics.median(v) for name, v in
            (("backward", backward), ("hidden", hidden), ("wait", wait), ("total", total))}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=48, help="examples per rank")
    parser.add_argument("--bucket-mb", type=float, default=5.0, help="one Linear layer (4 MiB + bias) per bucket")
    parser.add_argument("--poll-us", type=float, default=100.0, help="progress thread's test interval")
    parser.add_argument("--steps", type=int, default=15, help="timed steps of each kind")
    parser.add_argument("--trace", help="write a Chrome trace of the overlap/thread steps here")
    parser.add_argument("--plot", help="PNG of the trace's last two steps (forward, backward, bucket allreduces)")
    args = parser.parse_args()
    if args.plot and not args.trace:
        parser.error("--plot draws the trace: give --trace FILE too")
    comm = world()
    x = dt.tensor(np.random.default_rng(comm.rank).standard_normal((args.batch, args.width)).astype(np.float32))
    wrappers = {"thread": DataParallel(build(args.layers, args.width), comm, bucket_mb=args.bucket_mb,
                                       progress="thread", poll_interval=args.poll_us * 1e-6, sync="deferred"),
                "hooks": DataParallel(build(args.layers, args.width), comm, bucket_mb=args.bucket_mb,
                                      progress="hooks", sync="deferred"),
                "after": DataParallel(build(args.layers, args.width), comm, bucket_mb=args.bucket_mb, overlap=False,
                                      sync="deferred")}
    dp_for = {"overlap/thread": wrappers["thread"], "overlap/hooks": wrappers["hooks"],
              "after backward": wrappers["after"], "raw": wrappers["thread"]}
    nbytes = sum(p.data.nbytes for p in wrappers["thread"].parameters())
    raw_buf = np.ones(nbytes // 4, dtype=np.float32)

    tracer = trace.Tracer(rank=comm.rank)
    tracer.start(comm)
    rows = {run: [] for run in RUNS}
    for k in range(args.steps + 1):
        for run in RUNS:
            with trace.tracing(tracer if run == "overlap/thread" else None):
                row = step(run, dp_for[run], x, comm, raw_buf)
            if k:                                                  # round 0 warms up
                rows[run].append(row)
    if args.trace:
        tracer.write(args.trace, comm)
    if args.plot and comm.rank == 0:
        plot_trace(args.trace, args.plot)
    n_buckets = len(wrappers["thread"].reducer.buckets)
    for dp in wrappers.values():
        dp.close()

    results = {}
    for run in RUNS:
        mine = [(b1, [start for start, _ in spans or ()]) for _, b1, _, spans in rows[run]]
        results[run] = summarise(rows[run], comm.allgather_object(mine))
    raw = results["raw"]["wait"]
    for run in RUNS[:3]:
        r = results[run]
        r["ratio"] = raw / (r["hidden"] + r["wait"])
        r["fraction"] = r["hidden"] / (r["hidden"] + r["wait"])
    everyone = comm.gather_object(results, root=0)
    if comm.rank != 0:
        return 0
    print(f"# {machine()}; {comm.size} ranks; {_mpi_version()}")
    print(f"# model {args.layers} x Linear({args.width}, {args.width}) float32, batch {args.batch}/rank: "
          f"{nbytes / 2**20:.1f} MiB of gradients in {n_buckets} buckets of <= {args.bucket_mb:g} MiB; progress "
          f"thread polls every {args.poll_us:g} us; {args.steps} steps of each kind, interleaved")
    print(f"{'run':14s} {'rank':>4s} {'backward':>8s} {'hidden':>7s} {'wait':>7s} {'sync GB/s':>9s} "
          f"{'raw GB/s':>8s} {'bw ratio':>8s} {'hidden frac':>11s} {'backward+wait':>13s}")
    for run in RUNS:
        for rank, res in enumerate(everyone):
            r, raw = res[run], res["raw"]["wait"]
            sync = r["hidden"] + r["wait"]
            cells = (f"{nbytes / sync / 1e9:9.2f} {nbytes / raw / 1e9:8.2f} {r['ratio']:8.2f} {r['fraction']:11.2f}"
                     if run != "raw" else f"{'':9s} {nbytes / raw / 1e9:8.2f} {'':8s} {'':11s}")
            print(f"{run:14s} {rank:4d} {r['backward'] * 1e3:5.1f} ms {r['hidden'] * 1e3:4.1f} ms "
                  f"{r['wait'] * 1e3:4.1f} ms {cells} {r['total'] * 1e3:10.1f} ms")
    worst = {run: min(res[run]["ratio"] for res in everyone) for run in RUNS[:3]}
    fraction = min(res["overlap/thread"]["fraction"] for res in everyone)
    print(f"gradient-sync bandwidth / raw Allreduce (target >= 0.9): {worst['overlap/thread']:.2f} overlapped with "
          f"backward (progress thread), {worst['after backward']:.2f} after backward")
    print(f"fraction of allreduce time hidden behind backward (target >= 0.7): {fraction:.2f} (progress thread), "
          f"{min(res['overlap/hooks']['fraction'] for res in everyone):.2f} (callbacks only)")
    print("[worst rank]" + (f"; trace: {args.trace}" if args.trace else ""))
    return 0


def plot_trace(trace_path, png_path, steps=2):
    """Draw the last `steps` steps of a trace: per rank a compute row and a comm row."""
    import json

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    events = [e for e in json.loads(open(trace_path).read())["traceEvents"] if e["ph"] == "X"]
    ranks = sorted({e["pid"] for e in events})
    t0 = min(sorted(e["ts"] for e in events if e["name"] == "forward" and e["pid"] == r)[-steps] for r in ranks)
    shown = [e for e in events if e["ts"] >= t0]
    colours = {"forward": "tab:blue", "backward": "tab:orange", "sync gradients": "tab:red"}
    fig, ax = plt.subplots(figsize=(10, 1 + 0.8 * len(ranks)))
    for r in ranks:
        for e in (e for e in shown if e["pid"] == r):
            row = 2 * r + (0.8 if e["cat"] == "comm" else 0)
            colour = "tab:green" if e["name"].startswith("allreduce") else colours.get(e["name"], "grey")
            ax.broken_barh([((e["ts"] - t0) / 1e3, e["dur"] / 1e3)], (row, 0.7), facecolors=colour,
                           edgecolor="black", linewidth=0.3)
    ax.set_yticks([2 * r + y + 0.35 for r in ranks for y in (0, 0.8)])
    ax.set_yticklabels([f"rank {r} {lane}" for r in ranks for lane in ("compute", "allreduce")])
    ax.set_xlabel("ms")
    ax.set_title("forward (blue), backward (orange), sync wait (red), bucket allreduces (green)")
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)


def _mpi_version():
    from mpi4py import MPI

    return MPI.Get_library_version().splitlines()[0].strip()


if __name__ == "__main__":
    sys.exit(main())
