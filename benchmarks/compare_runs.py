"""Overlay the perplexity curves of several runs of one job and say how far they are from the first run.

    .venv/bin/python benchmarks/compare_runs.py runs/local runs/dp2 --labels "1 process" "2 ranks" \
        --out benchmarks/out/ptb_small_dp2_curves.png

Each RUN is a `disttrain run --out` directory (its metrics.jsonl). Rows are matched on the step (the same
global batch per step in every mode, so the same step means the same training tokens); printed: for every
split the number of matched rows, the largest relative difference of the loss against the first run and the
last perplexities. Curves of equivalent modes (data parallel, pipeline, sync parameter server) lie on top of
each other up to float32 rounding.
"""
import argparse
import os

from disttrain.train.metrics import read_metrics

SPLITS = ("train", "valid", "test")


def by_step(rows, split):
    """Rows of one split by step; rows whose loss is null (a diverged or skipped step) are left out."""
    return {r["step"]: r for r in rows if r.get("split") == split and r.get("loss") is not None}


def compare(reference, other):
    """{split: (matched rows, max relative loss difference, last ppl of reference, last ppl of other)}."""
    table = {}
    for split in SPLITS:
        ref, got = by_step(reference, split), by_step(other, split)
        steps = sorted(set(ref) & set(got))
        if not steps:
            continue
        worst = max(abs(got[s]["loss"] - ref[s]["loss"]) / abs(ref[s]["loss"]) for s in steps)
        table[split] = (len(steps), worst, ref[steps[-1]]["ppl"], got[steps[-1]]["ppl"])
    return table


def plot(runs, labels, path, title):
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    for (rows, label), style in zip(zip(runs, labels), ("-", "--", ":", "-.")):
        for split, marker in (("train", None), ("valid", "o")):
            points = sorted(by_step(rows, split).items())
            if points:
                ax.plot([s for s, _ in points], [r["ppl"] for _, r in points], linestyle=style, marker=marker,
                        markersize=4, label=f"{label} {split}")
    ax.set_yscale("log")
    ax.set(xlabel="step (same global batch in every run)", ylabel="perplexity", title=title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR")
    parser.add_argument("--labels", nargs="+")
    parser.add_argument("--out", help="PNG with the overlaid curves")
    parser.add_argument("--title", default="perplexity")
    args = parser.parse_args()
    labels = args.labels or args.runs
    if len(labels) != len(args.runs):
        parser.error(f"{len(args.runs)} runs but {len(labels)} labels")
    runs = [read_metrics(os.path.join(run, "metrics.jsonl")) for run in args.runs]
    for rows, label in zip(runs[1:], labels[1:]):
        print(f"{label} vs {labels[0]}:")
        for split, (matched, worst, ppl_ref, ppl_got) in compare(runs[0], rows).items():
            print(f"  {split:<5} {matched:>4} rows, max |loss - ref| / ref = {worst:.2e}; "
                  f"last ppl {ppl_got:.3f} vs {ppl_ref:.3f}")
    if args.out:
        plot(runs, labels, args.out, args.title)
        print(f"curves: {args.out}")


if __name__ == "__main__":
    main()
