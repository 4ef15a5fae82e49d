"""Training metrics: `metrics.jsonl` (one JSON object per logged step and per evaluation) and `curves.png`.

Every row has at least `step`, `epoch`, `split` ("train", "valid" or "test"), `loss`, `ppl`, `tokens_per_s`,
`time` (seconds of training so far, summed over resumed runs); train rows add `lr` and `grad_norm`, and rows of
character-level jobs add `bpc` (bits per character = loss / ln 2). Non-finite numbers (a diverged loss, an
overflowing perplexity) are written as null, so every line is strict JSON.

NOTE: each row is written and flushed as one line, so a crash loses nothing already logged; at most a torn last
line, which `MetricsWriter(path, resume_at=...)` cuts away. A job checkpoint records `position` (the file's
length then); resuming truncates the file back to it, so the rows of the steps that get re-run are not doubled.
"""
import json
import math
import os

__all__ = ["MetricsWriter", "read_metrics", "plot_curves", "perplexity"]

LN2 = math.log(2.0)


def perplexity(loss):
    """exp(loss), or inf where that overflows a float (NaN stays NaN)."""
    if math.isnan(loss):
        return loss
    return math.exp(loss) if loss < 700 else math.inf


class MetricsWriter:
    """Appends rows to a JSON-lines file; `rows` holds every row of the file (for plotting).

    resume_at: None starts a new file (an old one is replaced); an int keeps the first `resume_at` bytes of
    the existing file (the position a checkpoint recorded) and appends after them.
    """

    def __init__(self, path, resume_at=None):
        self.path = os.fspath(path)
        if resume_at is None:
            self._file = open(self.path, "w", encoding="utf-8")
            self.rows = []
        else:
            self._file = open(self.path, "a+", encoding="utf-8")
            size = self._file.seek(0, os.SEEK_END)
            if size < resume_at:
                raise ValueError(f"{self.path} has {size} bytes, the checkpoint expects at least {resume_at}; "
                                 "was it replaced after the checkpoint was written?")
            self._file.truncate(resume_at)
            self._file.seek(resume_at)
            self.rows = read_metrics(self.path)

    @property
    def position(self):
        """The file's length in bytes after the last row written (what a checkpoint records)."""
        return self._file.tell()

    def write(self, row):
        row = {key: (None if isinstance(value, float) and not math.isfinite(value) else value)
               for key, value in row.items()}
        line = json.dumps(row, allow_nan=False, separators=(", ", ": "))
        self._file.write(line + "\n")
        self._file.flush()
        self.rows.append(dict(row))

    def close(self):
        if not self._file.closed:
            self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_metrics(path):
    """The rows of a metrics.jsonl file, as dicts; a torn (unparsable) last line is skipped."""
    rows = []
    with open(path, encoding="utf-8") as fh:
        lines = fh.read().splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):   # the row a crash was writing
                break
            raise ValueError(f"{path}:{number}: not a JSON object: {line[:80]!r}") from None
    return rows


def plot_curves(rows, path, title=None):
    """Train and valid perplexity (the loss, for rows without one) against steps, log-scale y, written to `path`
    (PNG) atomically."""
    import matplotlib
    matplotlib.use("Agg")          # no display needed; selecting it here keeps imports side-effect free
    from matplotlib import pyplot as plt
    from matplotlib.ticker import FuncFormatter

    key = "ppl" if any("ppl" in r for r in rows) else "loss"
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    try:
        for split, style in (("train", "-"), ("valid", "o-")):
            points = [(r["step"], r[key]) for r in rows
                      if r.get("split") == split and r.get(key) is not None and math.isfinite(r[key])
                      and (key == "ppl" or r[key] > 0)]
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, style, label=split, markersize=4)
        tests = [r for r in rows if r.get("split") == "test" and r.get(key) is not None]
        if tests:
            ax.axhline(tests[-1][key], color="grey", linestyle=":", label=f"test {tests[-1][key]:.4g}")
        ax.set_yscale("log")
        plain = FuncFormatter(lambda value, _: f"{value:g}")       # 20, 5, 3 rather than 2x10^1
        ax.yaxis.set_major_formatter(plain)
        low, high = ax.get_ylim()
        if high / low < 30:                                         # label minor ticks over a short range only
            ax.yaxis.set_minor_formatter(plain)
        ax.set_xlabel("step")
        ax.set_ylabel("perplexity" if key == "ppl" else "loss")
        ax.grid(True, which="both", alpha=0.3)
        if title:
            ax.set_title(title)
        if ax.lines:
            ax.legend()
        fig.tight_layout()
        tmp = f"{path}.tmp"
        fig.savefig(tmp, format="png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
