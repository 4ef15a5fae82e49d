"""metrics.jsonl writing, truncation on resume, curves.png, and the progress display in both modes."""
import io
import json
import math

import pytest

from disttrain.train.metrics import MetricsWriter, perplexity, plot_curves, read_metrics
from disttrain.train.progress import Progress, format_row


def row(step, split="train", loss=2.0):
    return {"step": step, "epoch": 1, "split": split, "loss": loss, "ppl": perplexity(loss), "tokens_per_s": 10.0,
            "lr": 0.1, "time": 0.5}


def test_rows_are_flushed_lines_of_strict_json(tmp_path):
    path = tmp_path / "metrics.jsonl"
    writer = MetricsWriter(path)
    writer.write(row(1))
    assert json.loads(path.read_text()) == row(1)               # on disk before close
    writer.write(row(2, loss=math.inf))
    writer.write({**row(3), "loss": math.nan})
    writer.close()
    lines = path.read_text().splitlines()
    assert '"ppl": null' in lines[1] and '"loss": null' in lines[2] and "NaN" not in path.read_text()
    assert perplexity(1000.0) == math.inf


def test_resume_truncates_to_the_checkpoint_position_and_skips_a_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    writer = MetricsWriter(path)
    writer.write(row(1))
    position = writer.position
    writer.write(row(2))
    writer.close()
    with open(path, "a") as fh:
        fh.write('{"step": 3, "ep')                              # what a kill mid-write leaves
    assert [r["step"] for r in read_metrics(path)] == [1, 2]
    resumed = MetricsWriter(path, resume_at=position)
    assert [r["step"] for r in resumed.rows] == [1]
    resumed.write(row(2, loss=1.0))
    resumed.close()
    assert [(r["step"], r["loss"]) for r in read_metrics(path)] == [(1, 2.0), (2, 1.0)]
    with pytest.raises(ValueError, match="the checkpoint expects at least"):
        MetricsWriter(path, resume_at=10_000)


def test_curves_png(tmp_path):
    rows = [row(s, loss=3 - s / 10) for s in range(1, 11)] + [row(5, "valid"), row(10, "valid"), row(10, "test")]
    plot_curves(rows, tmp_path / "curves.png", title="t")
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    plot_curves([], tmp_path / "empty.png")                      # nothing logged yet: still a valid image
    assert (tmp_path / "empty.png").stat().st_size > 0 and not list(tmp_path.glob("*.tmp"))


def test_progress_plain_lines_and_tqdm_bar():
    out = io.StringIO()
    plain = Progress(total=10, bar=False, stream=out)
    plain.train_row({**row(4), "bpc": 2.0 / math.log(2)})
    plain.eval_row(row(4, "valid"))
    plain.close()
    assert out.getvalue().splitlines() == [
        "step 4/10 | epoch 1 | loss 2.0000 | ppl 7.39 | bpc 2.885 | 10 tok/s | lr 0.1",
        "valid @ step 4 | epoch 1 | loss 2.0000 | ppl 7.39 | 10 tok/s | lr 0.1"]

    out = io.StringIO()
    bar = Progress(total=10, initial=3, bar=True, stream=out)
    bar.advance()
    bar.train_row(row(4))
    bar.eval_row(row(4, "valid"))
    bar.close()
    text = out.getvalue()
    assert "4/10" in text and "valid @ step 4" in text
    assert format_row({**row(1), "loss": None, "ppl": None}).startswith("step 1 | epoch 1 | loss nan | ppl nan")
    huge = format_row({**row(1), "loss": 3.25e30, "ppl": 1.5e300})        # on the way to diverging
    assert huge.startswith("step 1 | epoch 1 | loss 3.25e+30 | ppl 1.5e+300 |"), huge
