"""Progress reporting: a tqdm bar with ETA on a terminal, plain log lines otherwise (files, pipes, CI logs).

Both show the same numbers: every `log_every` steps the bar's postfix, or one line
`step 200/4000 | epoch 1 | loss 1.9012 | ppl 6.69 | bpc 2.743 | 31,842 tok/s | lr 0.002`.
Evaluation results and messages are printed as lines in both modes (through tqdm.write under a bar).
"""
import sys

__all__ = ["Progress", "format_row"]


def format_row(row, total=None):
    """One human-readable line for a metrics row."""
    step = f"step {row['step']}" + (f"/{total}" if total else "")
    parts = [step if row["split"] == "train" else f"{row['split']} @ step {row['step']}", f"epoch {row['epoch']}",
             f"loss {_num(row.get('loss'), '.4f')}"]
    if "ppl" in row:
        parts.append(f"ppl {_num(row['ppl'], '.2f')}")
    if row.get("bpc") is not None:
        parts.append(f"bpc {row['bpc']:.3f}")
    rate = _rate(row)
    if rate is not None:
        parts.append(f"{rate[1]:,.0f} {rate[0]}/s")
    if row.get("lr") is not None:
        parts.append(f"lr {row['lr']:.4g}")
    return " | ".join(parts)


def _rate(row):
    """(unit, per second) of a row's throughput ("tokens_per_s": ("tok", ...)), or None."""
    for key, value in row.items():
        if key.endswith("_per_s") and value is not None:
            unit = key[:-len("_per_s")]
            return ("tok" if unit == "tokens" else unit), value
    return None


def _num(value, spec):
    """value in `spec` (e.g. ".4f"), or in 4 significant digits with an exponent where fixed point would print
    dozens of digits (a loss of 1e30 on its way to diverging); None (a NaN or infinity in metrics) as "nan"."""
    if value is None:
        return "nan"
    return format(value, ".4g" if abs(value) >= 1e6 else spec)


class Progress:
    """bar=None picks a bar when `stream` is a terminal; total is the expected number of steps."""

    def __init__(self, total, initial=0, bar=None, stream=None, desc="train"):
        self.stream = stream or sys.stdout
        self.total = total
        if bar is None:
            bar = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._bar = None
        if bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, unit="step", file=self.stream,
                             dynamic_ncols=True, mininterval=0.5)

    def advance(self, steps=1):
        if self._bar is not None:
            self._bar.update(steps)

    def train_row(self, row):
        if self._bar is not None:
            postfix = {"epoch": row["epoch"], "loss": _num(row.get("loss"), ".4f")}
            if row.get("bpc") is not None:
                postfix["bpc"] = f"{row['bpc']:.3f}"
            elif "ppl" in row:
                postfix["ppl"] = _num(row["ppl"], ".2f")
            rate = _rate(row)
            if rate is not None:
                postfix[f"{rate[0]}/s"] = f"{rate[1]:,.0f}"
            postfix["lr"] = f"{row['lr']:.3g}"
            self._bar.set_postfix(postfix, refresh=False)
        else:
            self.message(format_row(row, self.total))

    def eval_row(self, row):
        self.message(format_row(row))

    def message(self, text):
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def close(self):
        if self._bar is not None:
            self._bar.close()
            self._bar = None
