"""The deepest Transformer LM that trains under 1 GiB per rank on 2 data-parallel ranks, for each combination of
activation checkpointing ("none", "sqrt", "auto") and [parallel] shard_optimizer (0, 1, 2): an ESTIMATE from
measured per-block costs, not a training run of each size.

One step of a Transformer LM with PROBE_BLOCKS blocks (d_model 512, 8 heads, d_ff 2048, T = 128, 8 sequences
per rank, a 10,000-word vocabulary, float32) runs under disttrain.checkpointing.probe.ChainProbe with every
block kept, which gives one block's costs (bytes kept, forward and backward peaks, its parameter gradients)
and the costs before and after the block stack. A model of L blocks is that block L times; its step peak is
planner.simulate's under the setting ("none": nothing recomputed; "sqrt": round(sqrt(L)) segments; "auto":
the least peak any plan reaches, planner.smallest_budget, i.e. the smallest budget "auto" meets). Per rank,
the Trainer's own prediction (disttrain.train.memory_plan.predict, as memory.json's predicted_peak_bytes) with
that step peak:

    parameters + Adam state (1/2 with shard_optimizer 1 or 2) + the gradient buckets kept through the step
    (shard_optimizer 2 instead: the send rows of 3 buckets) + the step's peak above the parameters (with
    shard_optimizer 2 probed keeping half of each gradient once final, as a rank keeps its slice)

must be <= 1 GiB. The simulated peaks are checked against the MemoryMeter at PROBE_BLOCKS blocks (printed).
The step's peak is array memory (the MemoryMeter's); the process's Python, NumPy and MPI overheads are not in
it.

    python benchmarks/bench_largest_transformer.py

`--train LAYERS` checks one cell by training: under `mpiexec -n 2`, the Trainer in data mode runs that model
for two steps on random tokens with [memory] budget_mb = 1024, the given activation_checkpointing and
shard_optimizer, and prints the largest rank's measured peak (memory.json's measured_peak_bytes: array bytes
at the step's peak, parameters, gradients and optimizer state included), or the Trainer's error:

    mpiexec -n 2 python benchmarks/bench_largest_transformer.py --train 24 --checkpointing sqrt --shard 2
"""
import argparse
import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as the other benchmarks on the shared 2-core machine

import numpy as np  # noqa: E402

import disttrain as dt  # noqa: E402
from disttrain.checkpointing import MemoryMeter, apply_activation_checkpointing  # noqa: E402
from disttrain.checkpointing.auto import KeptItems  # noqa: E402
from disttrain.checkpointing.plan import plan_for  # noqa: E402
from disttrain.checkpointing.planner import StepCosts, simulate, smallest_budget  # noqa: E402
from disttrain.checkpointing.probe import ChainProbe  # noqa: E402
from disttrain.models import protocol  # noqa: E402
from disttrain.models.transformer_lm import TransformerLanguageModel  # noqa: E402
from disttrain.train import memory_plan  # noqa: E402

from disttrain.parallel.buckets import MAX_ROWS_IN_FLIGHT  # noqa: E402

GIB, MIB = 2 ** 30, 2 ** 20
BUCKET_MB = 25.0          # [parallel] bucket_mb's default
WIDTH, HEADS, T, BATCH, VOCAB, RANKS = 512, 8, 128, 8, 10_000, 2
PROBE_BLOCKS = 4


def holding(stage):
    """How a data-parallel rank of ZeRO stage `stage` holds its memory (data_mode.data_parallel_holding's), less
    the bucket layout: the step here is simulated from a 4-block probe, not profiled on the model, so stage 2's
    send rows are the Reducer's bound (rows_buckets buckets of at most bucket_mb or one parameter) on top."""
    return memory_plan.holding_for("data", RANKS, stage, rows_buckets=MAX_ROWS_IN_FLIGHT + 1, bucket_mb=BUCKET_MB)


def probe(held=memory_plan.Holding()):
    """(StepCosts of the probe model with its gradients held as `held` says, its step's measured peaks under
    "none" and "sqrt", block bytes, other parameter bytes)."""
    dt.manual_seed(0)
    model = TransformerLanguageModel(VOCAB, d_model=WIDTH, heads=HEADS, layers=PROBE_BLOCKS, max_len=T)
    model.train()
    tokens = np.random.default_rng(0).integers(0, VOCAB, size=(T + 1, BATCH))
    x, y = dt.tensor(tokens[:-1]), dt.tensor(tokens[1:])
    resident = list(model.state_dict(keep_vars=True).values())

    def step():
        loss, _ = protocol.forward_loss(model, x, y, None)
        with memory_plan.held_gradients(model.parameters(), held):
            loss.backward()
        for p in model.parameters():
            p.grad = None

    apply_activation_checkpointing(model, KeptItems())
    with ChainProbe(resident=resident) as chain:
        step()
    measured = {}
    for setting in ("none", "sqrt"):
        apply_activation_checkpointing(model, setting)
        with MemoryMeter(resident=resident) as meter:
            step()
        measured[setting] = meter.peak_bytes - meter.start_bytes
    block = sum(p.data.nbytes for p in model.blocks[0].parameters())
    total = sum(p.data.nbytes for p in model.parameters())
    return chain.costs("blocks"), measured, block, total - PROBE_BLOCKS * block


def costs_of(costs, layers):
    """The probe's costs with its middle block repeated `layers` times."""
    middle = costs.items[len(costs.items) // 2]
    return StepCosts((middle,) * layers, costs.before_peak, costs.before_keep, costs.after_peak, costs.after_change,
                     costs.tail_peak, unit="blocks")


def step_peak(costs, layers, setting):
    chain = costs_of(costs, layers)
    if setting == "auto":
        return smallest_budget(chain)[0]
    return simulate(chain, plan_for(layers, None if setting == "none" else setting))[0]


class _SameBytes(dt.nn.Module):
    """A stand-in with the parameter bytes of the real model in parameters no larger than its largest, the
    embedding (which bounds a gradient bucket's size); unwritten zero arrays: no pages touched."""

    def __init__(self, nbytes):
        super().__init__()
        largest, rest = VOCAB * WIDTH, int(nbytes) // 4
        self.pieces = dt.nn.ModuleList()
        while rest > 0:
            piece = dt.nn.Module()
            piece.weight = dt.nn.Parameter(dt.zeros(min(largest, rest)))
            self.pieces.append(piece)
            rest -= largest


def per_rank(costs, layers, setting, stage, block, other):
    """The Trainer's own prediction (memory_plan.predict, what it logs and writes to memory.json) for a rank of
    the L-block model, with the simulated step peak as the profile's: parameters, Adam's state and the
    gradient buckets as the data mode holds them (ZeRO stage `stage`), plus the step."""
    stand_in = _SameBytes(layers * block + other)
    profile = memory_plan.StepProfile(resident=0, activations=0, working=step_peak(costs, layers, setting))
    need = memory_plan.predict(stand_in, dt.optim.Adam(stand_in.parameters()), profile, holding(stage))
    return need.predicted_peak


def deepest(costs, setting, stage, block, other, most=512):
    """The most blocks that fit (0: none does), by bisection: the bytes grow with the depth."""
    low, high = 0, most
    while low < high:
        middle = (low + high + 1) // 2
        if per_rank(costs, middle, setting, stage, block, other) <= GIB:
            low = middle
        else:
            high = middle - 1
    return low


def main():
    costs, measured, block, other = probe()
    stage_two_costs = probe(holding(2))[0]     # each gradient's 1/N share kept, the rest dropped once final
    print(f"Transformer LM d_model {WIDTH}, {HEADS} heads, d_ff {4 * WIDTH}, T {T}, {BATCH} sequences per rank, "
          f"vocabulary {VOCAB:,}; a block: {block / MIB:.1f} MiB of parameters, embeddings and decoder "
          f"{other / MIB:.1f} MiB")
    for setting in ("none", "sqrt"):
        simulated = step_peak(costs, PROBE_BLOCKS, setting)
        print(f"check at {PROBE_BLOCKS} blocks, {setting}: measured step peak {measured[setting] / MIB:.1f} MiB, "
              f"simulated {simulated / MIB:.1f} MiB ({simulated / measured[setting]:.3f}x)")
    print(f"\nDeepest model under 1 GiB per rank on {RANKS} ranks (estimate):\n")
    print("| activation_checkpointing | shard_optimizer = 0 | 1 | 2 |")
    print("| --- | --- | --- | --- |")
    for setting in ("none", "sqrt", "auto"):
        cells = []
        for stage in (0, 1, 2):
            layers = deepest(stage_two_costs if stage == 2 else costs, setting, stage, block, other)
            params = (layers * block + other) / 4
            cells.append(f"{layers} blocks ({params / 1e6:.0f} M parameters)")
        print(f"| {setting} | " + " | ".join(cells) + " |")


def random_tokens(steps):
    """LanguageModelData on uniform random ids: `steps` training windows of the probe's shape per rank (and
    one window each of valid and test, so the final evaluation is quick)."""
    from disttrain.data.corpus import Corpus
    from disttrain.data.source import LanguageModelData
    from disttrain.data.vocab import Vocabulary

    rng = np.random.default_rng(0)
    streams = BATCH * RANKS
    ids = lambda n: rng.integers(0, VOCAB, size=n, dtype=np.int64)
    corpus = Corpus(ids(streams * (steps * T + 1)), ids(2 * T + 2), ids(2 * T + 2),
                    Vocabulary([f"w{i}" for i in range(VOCAB)]))
    return LanguageModelData(corpus, streams, T)


def train(layers, checkpointing, shard):
    """Two data-parallel steps of the `layers`-block model under 1 GiB -> prints each rank's measured peak."""
    from disttrain.parallel import world
    from disttrain.train.jobspec import JobSpecError
    from disttrain.train.loop import MemoryBudgetExceeded

    dt.manual_seed(0)
    model = TransformerLanguageModel(VOCAB, d_model=WIDTH, heads=HEADS, layers=layers, max_len=T)
    rank = world().rank
    try:
        trainer = dt.train.fit(model, random_tokens(2), lambda params: dt.optim.Adam(params, lr=1e-4),
                               mode="data", max_steps=2, log_every=1, eval_every=2, progress=False,
                               activation_checkpointing=checkpointing, budget_mb=GIB / MIB, shard_optimizer=shard)
    except (JobSpecError, MemoryBudgetExceeded) as exc:     # every rank stops alike: rank 0 says why
        if rank == 0:
            print(f"{layers} blocks, {checkpointing}, shard_optimizer {shard}: {exc}", flush=True)
        raise SystemExit(1)
    peak = trainer.measured_peak_bytes                      # the largest rank's
    if rank == 0:
        print(f"{layers} blocks, {checkpointing}, shard_optimizer {shard}: trained 2 steps; measured peak "
              f"{peak / MIB:.1f} MiB of the 1024 MiB budget ({peak / GIB:.3f}), the largest rank's", flush=True)


def parse():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, metavar="LAYERS", help="train this depth under mpiexec -n 2 instead")
    parser.add_argument("--checkpointing", default="auto", choices=("none", "sqrt", "auto"))
    parser.add_argument("--shard", type=int, default=2, choices=(0, 1, 2), help="shard_optimizer")
    return parser.parse_args()


if __name__ == "__main__":
    args = parse()
    if args.train is None:
        main()
    else:
        train(args.train, args.checkpointing, args.shard)
