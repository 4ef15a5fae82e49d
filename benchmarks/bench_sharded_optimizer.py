"""Sharded optimizer state (DataParallel(shard_optimizer=1 | 2), ZeRO) against plain data parallelism, on the
ptb_small LSTM LM (10,000-word vocabulary, 2 x 200 LSTM, 4.65 M parameters, float32) with Adam.

    mpiexec -n 4 .venv/bin/python benchmarks/bench_sharded_optimizer.py memory
    mpiexec -n 2 .venv/bin/python benchmarks/bench_sharded_optimizer.py step [--rounds 7] [--steps 5]

memory: the optimizer-state bytes each rank holds after one step, for N = 1, 2 and 4 ranks side by side in
one run (sub-communicators of the launched ranks: rank r is in group r // N), unsharded and in stages 1
and 2. Ratio = the largest rank's bytes x N / the one-process bytes (target <= 1.05: at most 5% above 1/N).

step: step time (zero_grad, forward, backward with the gradient exchange, global-norm clipping at 5, Adam
step) of stage 0, 1 and 2 on the launched ranks, three models side by side in interleaved rounds of
`--steps` steps each on the same PTB segments (B/N of the batch's 20 streams per rank, bptt 20); median
seconds a step of the slowest rank. Ratio = stage k / stage 0 (target <= 1.1).
"""
import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")   # set before NumPy loads BLAS: one core per rank
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
from harness import machine  # noqa: E402

import disttrain as dt  # noqa: E402
from disttrain.data.batching import TBPTTIterator, batchify, shard_streams  # noqa: E402
from disttrain.data.ptb import PTB_VOCAB_SIZE, default_ptb_path, load_ptb  # noqa: E402
from disttrain.models import LSTMLanguageModel  # noqa: E402
from disttrain.nn.utils import clip_grad_norm_  # noqa: E402
from disttrain.parallel import DataParallel, world  # noqa: E402
from disttrain.parallel.sharded_optimizer import ShardedOptimizer  # noqa: E402
from disttrain.tensor.host_allocator import retain_freed_memory  # noqa: E402

STAGES = (0, 1, 2)


def ptb_small():
    dt.manual_seed(0)
    return LSTMLanguageModel(PTB_VOCAB_SIZE, hidden=200, layers=2, init_scale=0.1)


def wrapped(comm, stage, bucket_mb, overlap):
    model = ptb_small()
    optimizer = dt.optim.Adam(model.parameters(), lr=1e-3)
    return DataParallel(model, comm, bucket_mb=bucket_mb, optimizer=optimizer, overlap=overlap, shard_optimizer=stage)


def train_step(dp, inputs, targets, hidden):
    """One step; returns the carried (h, c)."""
    opt = dp.optimizer
    opt.zero_grad()
    loss, (h, c) = dp.module.forward_loss(dt.tensor(inputs), dt.tensor(targets), hidden)
    loss.backward()
    if isinstance(opt, ShardedOptimizer):
        opt.clip_grad_norm_(5.0)
    else:
        clip_grad_norm_(dp.module.parameters(), 5.0)
    opt.step()
    return h.detach(), c.detach()


def state_bytes(optimizer):
    """This rank's optimizer-state bytes (a ShardedOptimizer counts its slices)."""
    if hasattr(optimizer, "state_nbytes"):
        return optimizer.state_nbytes()
    return sum(v.nbytes for entry in optimizer.state.values() for v in entry.values() if hasattr(v, "nbytes"))


def memory(args):
    comm = world()
    rng = np.random.default_rng(0)
    inputs, targets = rng.integers(0, PTB_VOCAB_SIZE, (20, 4)), rng.integers(0, PTB_VOCAB_SIZE, (20, 4))
    rows = []
    for n in (1, 2, 4):
        if comm.size % n:
            continue
        group = comm.Split(color=comm.rank // n)
        for stage in STAGES:
            dp = wrapped(group, stage, args.bucket_mb, overlap=False)
            train_step(dp, inputs, targets, None)
            everyone = comm.allgather_object(state_bytes(dp.optimizer))
            dp.close()
            rows.append((n, stage, everyone[:n]))
    if comm.rank != 0:
        return
    one = next(max(b) for n, stage, b in rows if n == 1 and stage == 0)
    print(f"# {machine()}")
    print(f"# optimizer-state bytes per rank, Adam (fp32 exp_avg + exp_avg_sq), ptb_small LSTM LM, bucket_mb "
          f"{args.bucket_mb:g}; {comm.size} launched ranks")
    print("| N | shard_optimizer | bytes per rank (ranks of group 0) | largest / one-process | x N (target <= 1.05) |")
    print("| --- | --- | --- | --- | --- |")
    for n, stage, per_rank in rows:
        share = max(per_rank) / one
        print(f"| {n} | {stage} | {', '.join(f'{b:,}' for b in per_rank)} | {share:.4f} | {share * n:.4f} |")


def step(args):
    comm = world()
    corpus = load_ptb(args.ptb)
    streams = shard_streams(batchify(corpus.train, 20), comm.rank, comm.size)
    segments = [seg for _, seg in zip(range(args.warmup + args.rounds * args.steps), TBPTTIterator(streams, 20))]
    models = {stage: wrapped(comm, stage, args.bucket_mb, args.overlap) for stage in STAGES}
    hidden = {stage: None for stage in STAGES}
    times = {stage: [] for stage in STAGES}
    position = {stage: 0 for stage in STAGES}

    def run(stage, count, timed):
        comm.Barrier()
        start = time.perf_counter()
        for _ in range(count):
            inputs, targets = segments[position[stage]]
            position[stage] += 1
            hidden[stage] = train_step(models[stage], inputs, targets, hidden[stage])
        if timed:
            times[stage].append((time.perf_counter() - start) / count)

    for stage in STAGES:
        run(stage, args.warmup, timed=False)
    for _ in range(args.rounds):
        for stage in STAGES:
            run(stage, args.steps, timed=True)
    medians = {stage: statistics.median(t) for stage, t in times.items()}
    slowest = comm.Allreduce(np.array([medians[s] for s in STAGES]), op="max", what="allreduce of step times")
    differences = [max(float(np.abs(p.data - q.data).max()) for p, q in
                       zip(models[0].module.parameters(), models[stage].module.parameters())) for stage in STAGES]
    nbytes = {stage: state_bytes(models[stage].optimizer) for stage in STAGES}
    for dp in models.values():
        dp.close()
    if comm.rank != 0:
        return
    load = os.getloadavg()
    print(f"# {machine()}")
    print(f"# ptb_small LSTM LM, Adam, clip 5, {comm.size} ranks x {20 // comm.size} streams x bptt 20, bucket_mb "
          f"{args.bucket_mb:g}, overlap {args.overlap}; {args.rounds} interleaved rounds of {args.steps} steps "
          f"after {args.warmup}; load average at the end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print("| shard_optimizer | ms per step (median, slowest rank) | / stage 0 (target <= 1.1) | Adam state bytes "
          "on rank 0 |")
    print("| --- | --- | --- | --- |")
    for k, stage in enumerate(STAGES):
        print(f"| {stage} | {slowest[k] * 1e3:.1f} | {slowest[k] / slowest[0]:.3f} | {nbytes[stage]:,} |")
    print(f"# after {args.warmup + args.rounds * args.steps} steps each, largest parameter difference from stage 0 "
          f"(rank 0, float32): stage 1 {differences[1]:.2e}, stage 2 {differences[2]:.2e}")


def main():
    retain_freed_memory()          # as `disttrain run` does: each step's big arrays reused, not faulted in again
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("memory", "step"))
    parser.add_argument("--bucket-mb", type=float, default=25.0)
    parser.add_argument("--overlap", choices=("true", "false"), default="false",
                        help="reduce the buckets during backward or after it (default: after, the faster on 2 cores)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--ptb", default=str(default_ptb_path()))
    args = parser.parse_args()
    args.overlap = args.overlap == "true"
    (memory if args.what == "memory" else step)(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
