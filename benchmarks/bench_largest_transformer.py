"""The deepest Transformer LM that trains under 1 GiB per rank on 2 data-parallel ranks, for each combination of
activation checkpointing ("none", "sqrt", "auto") and [parallel] shard_optimizer (0, 1, 2): an ESTIMATE from
measured per-block costs, not a training run of each size.

One step of a Transformer LM with PROBE_BLOCKS blocks (d_model 512, 8 heads, d_ff 2048, T = 128, 8 sequences
per rank, a 10,000-word vocabulary, float32) runs under disttrain.checkpointing.probe.ChainProbe with every
block kept, which gives one block's costs (bytes kept, forward and backward peaks, its parameter gradients)
and the costs before and after the block stack. A model of L blocks is that block L times; its step peak is
planner.simulate's under the setting ("none": nothing recomputed; "sqrt": round(sqrt(L)) segments; "auto":
the least peak any plan reaches, planner.smallest_budget, i.e. the smallest budget "auto" meets). Per rank:

    parameters 4P + Adam state 8P (/ 2 with shard_optimizer 1 or 2) + the step's peak above that, where with
    shard_optimizer 2 the step holds 1/2 of the gradients plus one bucket (25 MiB) instead of all of them

must be <= 1 GiB. The simulated peaks are checked against the MemoryMeter at PROBE_BLOCKS blocks (printed).
The step's peak is array memory (the MemoryMeter's); the process's Python, NumPy and MPI overheads are not in
it.

    python benchmarks/bench_largest_transformer.py
"""
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

GIB, MIB = 2 ** 30, 2 ** 20
WIDTH, HEADS, T, BATCH, VOCAB, RANKS, BUCKET = 512, 8, 128, 8, 10_000, 2, 25 * MIB
PROBE_BLOCKS = 4


def probe():
    """(StepCosts of the probe model, its step's measured peaks under "none" and "sqrt", block bytes, other
    parameter bytes)."""
    dt.manual_seed(0)
    model = TransformerLanguageModel(VOCAB, d_model=WIDTH, heads=HEADS, layers=PROBE_BLOCKS, max_len=T)
    model.train()
    tokens = np.random.default_rng(0).integers(0, VOCAB, size=(T + 1, BATCH))
    x, y = dt.tensor(tokens[:-1]), dt.tensor(tokens[1:])
    resident = list(model.state_dict(keep_vars=True).values())

    def step():
        loss, _ = protocol.forward_loss(model, x, y, None)
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


def per_rank(costs, layers, setting, stage, block, other):
    params = layers * block + other
    optimizer = 2 * params / (RANKS if stage else 1)
    peak = step_peak(costs, layers, setting)
    if stage == 2:
        peak -= params - (params / RANKS + BUCKET)
    return params + optimizer + peak


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
            layers = deepest(costs, setting, stage, block, other)
            params = (layers * block + other) / 4
            cells.append(f"{layers} blocks ({params / 1e6:.0f} M parameters)")
        print(f"| {setting} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
