"""Training metrics: `metrics.jsonl` (one JSON object per logged step and per evaluation) and `curves.png`.

Every row has at least `step`, `epoch`, `split` ("train", "valid" or "test"), `loss`, `ppl`, `tokens_per_s`,
`time` (seconds of training so far, summed over resumed runs); train rows add `lr` and `grad_norm`, and rows of
character-level jobs add `bpc` (bits per character = loss / ln 2). Non-finite numbers (a diverged loss, an
overflowing perplexity) are written as null, so every line is strict JSON.

NOTE: each row is written and flushed as one line, so a process that dies loses nothing already logged; at most
a torn last line, which `MetricsWriter(path, resume_at=...)` cuts away. A job checkpoint records `position` (the
file's length then), after `sync()` has made those bytes durable; resuming truncates the file back to it, so the
rows of the steps that get re-run are not doubled. A file shorter than that position (rows the machine lost with
its power, or a file cut or removed by hand) keeps the complete rows it has (`shortfall` says what is missing).
"""
import contextlib
import io
import json
import math
import os
from dataclasses import dataclass

from disttrain.fsutil import naming, write_atomically

__all__ = ["MetricsWriter", "Shortfall", "shortfall", "read_metrics", "plot_curves", "perplexity"]

LN2 = math.log(2.0)


def perplexity(loss):
    """exp(loss), or inf where that overflows a float (NaN stays NaN)."""
    if math.isnan(loss):
        return loss
    return math.exp(loss) if loss < 700 else math.inf


class MetricsWriter:
    """Appends rows to a JSON-lines file; `rows` holds every row of the file (for plotting).

    resume_at: None starts a new file (an old one is replaced); an int keeps the first `resume_at` bytes of
    the existing file (the position a checkpoint recorded), or all of its complete lines when it is shorter,
    and appends after them.

    A row that cannot be written raises the OSError (naming the file) once: close() does not raise it again.
    """

    def __init__(self, path, resume_at=None):
        self.path = os.fspath(path)
        self._failed = False
        if resume_at is None:
            self._file = open(self.path, "w", encoding="utf-8")
            self.rows = []
        else:
            self._file = open(self.path, "a+", encoding="utf-8")
            keep = _complete_lines_length(self.path, resume_at)
            self._file.truncate(keep)
            self._file.seek(keep)
            self.rows = read_metrics(self.path)

    @property
    def position(self):
        """The file's length in bytes after the last row written (what a checkpoint records)."""
        return self._file.tell()

    def write(self, row):
        row = {key: (None if isinstance(value, float) and not math.isfinite(value) else value)
               for key, value in row.items()}
        line = json.dumps(row, allow_nan=False, separators=(", ", ": "))
        with self._noting_failure():
            self._file.write(line + "\n")
            self._file.flush()
        self.rows.append(dict(row))

    def sync(self):
        """Make every row written so far durable (fsync); returns `position`. A checkpoint records a position
        only once the rows before it are on disk, so that a power loss cannot leave the file shorter."""
        with self._noting_failure():
            self._file.flush()
            os.fsync(self._file.fileno())
        return self.position

    @property
    def deleted(self):
        """True when the file was removed from its directory while open (rows go nowhere anyone can read)."""
        return os.fstat(self._file.fileno()).st_nlink == 0

    def close(self):
        if self._file.closed:
            return
        try:
            self._file.close()       # closed even when its last flush fails
        except OSError:
            if not self._failed:     # the failure write() or sync() raised already: not a second time
                raise

    @contextlib.contextmanager
    def _noting_failure(self):
        try:
            with naming(self.path):
                yield
        except OSError:
            self._failed = True
            raise

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@dataclass
class Shortfall:
    """What a metrics file lacks against the position a checkpoint recorded: `missing_bytes`, `kept_rows` (the
    complete rows it has) and `missing_rows` (None when the checkpoint did not record its row count)."""
    missing_bytes: int
    kept_rows: int
    missing_rows: object = None


def shortfall(path, position, rows=None):
    """None when the file `path` holds at least `position` bytes; else its Shortfall (rows: the row count the
    checkpoint recorded at that position, if it did). A missing file holds 0 bytes."""
    if not os.path.exists(path):
        return Shortfall(position, 0, rows)
    if os.path.getsize(path) >= position:
        return None
    kept = len(read_metrics(path))
    return Shortfall(position - _complete_lines_length(path, position), kept,
                     rows - kept if rows is not None else None)


def _complete_lines_length(path, limit):
    """The length of the file's first `limit` bytes cut back to the end of its last complete line."""
    with open(path, "rb") as fh:
        head = fh.read(limit)
    return len(head) if head.endswith(b"\n") or len(head) == limit else head.rfind(b"\n") + 1


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
    (PNG) atomically (fsutil.write_atomically: an OSError naming `path`, and no temporary file, when it fails)."""
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
        png = io.BytesIO()
        fig.savefig(png, format="png")
    finally:
        plt.close(fig)
    write_atomically(path, png.getvalue())
