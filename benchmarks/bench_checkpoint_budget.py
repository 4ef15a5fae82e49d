"""Activation checkpointing "auto" against "sqrt" and "none" at memory budgets from the smallest feasible to
unlimited, on the LSTM LM at T = 2048 and on the Transformer LM: the measured peak of a step under each budget,
and the step time, side by side in one run.

For each model, at each budget from the smallest that "auto" can meet (the planner's NoPlanFits figure) to
"none"'s peak and beyond, disttrain.checkpointing.auto.fit_to_budget (what the Trainer runs for
activation_checkpointing = "auto") sets its plan, and the step is measured with it, with "none" and with
"sqrt". A step is forward_loss + backward on one batch (no optimizer update: it allocates nothing the meter
counts on the CPU). Peaks are the MemoryMeter's array bytes above what the step
starts with (what [memory] budget_mb limits; deterministic, so measured once); times are the fastest of
--repeats steps (the box is shared: the fastest is the least disturbed).

At each budget the three settings' steps are timed in turn (none, sqrt, auto, repeated), so that load on a
shared machine falls on all alike. Checks printed at the end: every "auto" peak <= its budget (the exit
status); at every budget that "sqrt" also fits, whether the step time of "auto" <= that of "sqrt".

Then, on the LSTM LM with a batch of 16 (activations outweigh the parameter gradients), the smallest budget
"auto" meets as the window T grows, every time step its own measured item: binomial (nested) plans, whose peak
grows like log T, against the least peak of any one-level plan, which grows like sqrt(T) (--lengths).

    python benchmarks/bench_checkpoint_budget.py [--repeats 5] [--budgets 7]
        [--plot benchmarks/out/checkpoint_budget.png] [--lengths 128,256,512,1024,2048]

Sizes are small so that the whole run takes a few minutes on 2 shared cores: the LSTM LM has hidden 64 and a
vocabulary of 50 (batch 2, T = 2048), the Transformer LM d_model 64, 8 blocks, 4 heads, T = 128, batch 8.
"""
import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as the other benchmarks on the shared 2-core machine

import numpy as np  # noqa: E402

import disttrain as dt  # noqa: E402
from disttrain.checkpointing import MemoryMeter, apply_activation_checkpointing  # noqa: E402
from disttrain.checkpointing.auto import MOST_ITEMS, KeptItems, fit_to_budget  # noqa: E402
from disttrain.checkpointing.planner import NoPlanFits, best_one_level, native_plan  # noqa: E402
from disttrain.checkpointing.probe import ChainProbe  # noqa: E402
from disttrain.models import protocol  # noqa: E402
from disttrain.models.lstm_lm import LSTMLanguageModel  # noqa: E402
from disttrain.models.transformer_lm import TransformerLanguageModel  # noqa: E402

MIB = 2 ** 20
VOCAB = 50


def lstm_lm():
    dt.manual_seed(0)
    tokens = np.random.default_rng(0).integers(0, VOCAB, size=(2049, 2))
    return "LSTM LM (hidden 64, T 2048, batch 2)", LSTMLanguageModel(VOCAB, hidden=64, layers=1), tokens


def transformer_lm():
    dt.manual_seed(0)
    tokens = np.random.default_rng(0).integers(0, VOCAB, size=(129, 8))
    model = TransformerLanguageModel(VOCAB, d_model=64, heads=4, layers=8, max_len=128)
    return "Transformer LM (d_model 64, 8 blocks, T 128, batch 8)", model, tokens


class Bench:
    def __init__(self, model, tokens, repeats):
        self.model, self.repeats = model, repeats
        self.x, self.y = dt.tensor(tokens[:-1]), dt.tensor(tokens[1:])
        self.resident = list(model.state_dict(keep_vars=True).values()) + [self.x, self.y]
        model.train()

    def step(self):
        loss, _ = protocol.forward_loss(self.model, self.x, self.y, None)
        loss.backward()

    def clear(self):
        for p in self.model.parameters():
            p.grad = None

    def peak(self, setting):
        """Peak bytes of one step with `setting` (deterministic: measured once)."""
        apply_activation_checkpointing(self.model, setting)
        self.clear()
        with MemoryMeter(resident=self.resident) as meter:
            self.step()
        self.clear()
        return meter.peak_bytes - meter.start_bytes

    def fastest(self, settings):
        """The fastest of `repeats` steps of each setting, taken in turn (so that load on the shared box falls
        on all alike)."""
        seconds = [[] for _ in settings]
        for _ in range(self.repeats):
            for times, setting in zip(seconds, settings):
                apply_activation_checkpointing(self.model, setting)
                start = time.perf_counter()
                self.step()
                times.append(time.perf_counter() - start)
                self.clear()
        return [min(t) for t in seconds]

    def auto(self, budget, most_items=MOST_ITEMS):
        """The BudgetChoice of fit_to_budget, or the NoPlanFits it raised."""
        try:
            return fit_to_budget(self.model, self.step, budget, resident=self.resident, most_items=most_items)
        except NoPlanFits as exc:
            return exc
        finally:
            self.clear()


def run_model(build, budgets, repeats):
    name, model, tokens = build()
    bench = Bench(model, tokens, repeats)
    none_peak, sqrt_peak = bench.peak("none"), bench.peak("sqrt")
    smallest = bench.auto(1).smallest
    grid = sorted({int(b) for b in np.geomspace(smallest, none_peak, budgets - 1)} | {int(none_peak * 1.1)})
    print(f"\n{name}: none {none_peak / MIB:.2f} MiB, sqrt {sqrt_peak / MIB:.2f} MiB; smallest feasible budget for "
          f"auto {smallest / MIB:.2f} MiB")
    print("| budget MiB | auto peak MiB | sqrt fits | step ms none / sqrt / auto | auto extra ms (predicted) | "
          "sqrt extra ms | auto / sqrt step time | auto plan |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    rows = []
    for budget in grid:
        choice = bench.auto(budget)
        if isinstance(choice, NoPlanFits):
            print(f"| {budget / MIB:.2f} | no plan: {choice} | | | | | | |")
            continue
        peak = bench.peak(choice.plan)
        none_s, sqrt_s, auto_s = bench.fastest(["none", "sqrt", choice.plan])
        row = dict(budget=budget, peak=peak, none=none_s, sqrt=sqrt_s, auto=auto_s, sqrt_fits=sqrt_peak <= budget,
                   predicted=choice.extra_seconds)
        rows.append(row)
        print(f"| {budget / MIB:.2f} | {peak / MIB:.2f} | {'yes' if row['sqrt_fits'] else 'no'} | "
              f"{none_s * 1e3:.0f} / {sqrt_s * 1e3:.0f} / {auto_s * 1e3:.0f} | {(auto_s - none_s) * 1e3:.0f} "
              f"({choice.extra_seconds * 1e3:.0f}) | {(sqrt_s - none_s) * 1e3:.0f} | {auto_s / sqrt_s:.2f} | "
              f"{choice.plan.describe(choice.unit)[6:80]} |")
    return dict(name=name, none=none_peak, sqrt=sqrt_peak, smallest=smallest, rows=rows)


def binomial_sweep(lengths, batch=16):
    """The smallest budget "auto" meets on the LSTM LM as the window grows, every time step its own measured item
    (fit_to_budget's most_items = T): the plan it chooses there, its measured peak, against the least peak of any
    one-level plan (the planner's best_one_level at its least budget, measured) and of "sqrt"."""
    print(f"\nLSTM LM (hidden 64, batch {batch}): the smallest budget against the window length T, every time step an "
          "item")
    print("| T | none MiB | sqrt MiB | least one-level plan MiB (measured) | auto at its smallest budget: peak MiB "
          "(budget) | auto plan | extra forward passes | planner s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    rows = []
    for steps in lengths:
        dt.manual_seed(0)
        tokens = np.random.default_rng(0).integers(0, VOCAB, size=(steps + 1, batch))
        bench = Bench(LSTMLanguageModel(VOCAB, hidden=64, layers=1), tokens, 1)
        start = time.process_time()
        smallest = bench.auto(1, most_items=steps).smallest
        choice = bench.auto(smallest, most_items=steps)
        planner_s = time.process_time() - start
        one_level = least_one_level(bench, steps)
        row = dict(steps=steps, none=bench.peak("none"), sqrt=bench.peak("sqrt"), one_level=one_level,
                   auto=bench.peak(choice.plan), budget=smallest, depth=choice.plan.depth())
        rows.append(row)
        print(f"| {steps} | {row['none'] / MIB:.2f} | {row['sqrt'] / MIB:.3f} | {one_level / MIB:.3f} | "
              f"{row['auto'] / MIB:.3f} ({smallest / MIB:.3f}) | {choice.plan.describe(choice.unit)[6:70]} | "
              f"{choice.plan.recomputed_items() / steps:.1f} | {planner_s:.1f} |")
    return rows


def check_sweep(rows):
    """Print whether "auto" met its budget and went nested at every T; returns whether it met the budget."""
    under = sum(r["auto"] <= r["budget"] for r in rows)
    nested = sum(r["depth"] > 1 for r in rows)
    below = sum(r["auto"] < r["one_level"] for r in rows)
    print(f"binomial sweep: auto peak <= budget at {under}/{len(rows)} lengths "
          f"({'OK' if under == len(rows) else 'FAILED'}); nested plan chosen at {nested}/{len(rows)}; below the least "
          f"one-level peak at {below}/{len(rows)}")
    return under == len(rows)


def least_one_level(bench, steps):
    """The measured peak of the one-level plan with the least simulated peak over every time step."""
    apply_activation_checkpointing(bench.model, KeptItems(steps))
    bench.clear()
    with ChainProbe(resident=bench.resident) as probe:
        bench.step()
    bench.clear()
    costs = probe.costs("time steps")
    low, high = 0, bench.peak("none")
    while low < high:
        middle = (low + high) // 2
        low, high = (middle + 1, high) if best_one_level(costs, middle, fastest=False) is None else (low, middle)
    return bench.peak(native_plan(costs, best_one_level(costs, low, fastest=False).plan))


def check(result):
    rows = result["rows"]
    under = sum(r["peak"] <= r["budget"] for r in rows)
    both = [r for r in rows if r["sqrt_fits"]]
    faster = sum(r["auto"] <= r["sqrt"] for r in both)
    print(f"{result['name']}: auto peak <= budget at {under}/{len(rows)} budgets "
          f"({'OK' if under == len(rows) else 'FAILED'}); where sqrt fits ({len(both)} budgets) auto's step time "
          f"<= sqrt's at {faster}/{len(both)}")
    return under == len(rows)


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(results), figsize=(6 * len(results), 7), squeeze=False)
    for k, result in enumerate(results):
        rows = result["rows"]
        budgets = [r["budget"] / MIB for r in rows]
        top, bottom = axes[0][k], axes[1][k]
        top.plot(budgets, [r["peak"] / MIB for r in rows], "o-", label="auto")
        top.plot(budgets, budgets, ":", color="grey", label="budget")
        top.axhline(result["none"] / MIB, linestyle="--", color="C1", label="none")
        top.axhline(result["sqrt"] / MIB, linestyle="--", color="C2", label="sqrt")
        top.set_title(result["name"], fontsize=9)
        top.set_ylabel("step peak (MiB)")
        for key, style, color in (("auto", "o-", "C0"), ("none", "x--", "C1"), ("sqrt", "s--", "C2")):
            bottom.plot(budgets, [r[key] * 1e3 for r in rows], style, color=color, label=key)
        bottom.set_xlabel("budget (MiB)")
        bottom.set_ylabel("step time (ms, fastest of the repeats)")
        for ax in (top, bottom):
            ax.set_xscale("log")
            ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    print(f"plot: {path}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per setting (the fastest counts)")
    parser.add_argument("--budgets", type=int, default=7, help="budgets per model")
    parser.add_argument("--plot", default=str(Path(__file__).resolve().parent / "out" / "checkpoint_budget.png"))
    parser.add_argument("--lengths", default="128,256,512,1024,2048",
                        help="window lengths T of the binomial sweep (empty: none)")
    args = parser.parse_args()
    results = [run_model(build, args.budgets, args.repeats) for build in (lstm_lm, transformer_lm)]
    sweep = binomial_sweep([int(t) for t in args.lengths.split(",") if t])
    print()
    ok = all([check(r) for r in results]) & check_sweep(sweep)
    plot(results, Path(args.plot))
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
