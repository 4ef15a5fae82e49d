"""metrics.jsonl writing, truncation on resume, curves.png, and the progress display in both modes."""
import errno
import io
import json
import math
import os

import pytest

from disttrain.train.metrics import MetricsWriter, Shortfall, perplexity, plot_curves, read_metrics, shortfall
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


def test_a_file_shorter_than_the_checkpoint_position_keeps_its_complete_rows(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with MetricsWriter(path) as writer:
        for step in (1, 2, 3):
            writer.write(row(step))
        position, rows = writer.position, len(writer.rows)
    text = path.read_text()
    path.write_text(text[:len(text) * 2 // 3 - 5])               # a power loss: the tail never reached the disk
    kept_bytes = len(text.splitlines(keepends=True)[0])
    assert shortfall(path, position, rows) == Shortfall(position - kept_bytes, 1, 2)
    assert shortfall(path, position) == Shortfall(position - kept_bytes, 1, None)     # no row count recorded
    resumed = MetricsWriter(path, resume_at=position)            # keeps step 1, cuts the torn step 2
    assert [r["step"] for r in resumed.rows] == [1] and resumed.position == kept_bytes
    resumed.write(row(4))
    resumed.close()
    assert [r["step"] for r in read_metrics(path)] == [1, 4]
    assert shortfall(path, kept_bytes) is None
    os.unlink(path)
    assert shortfall(path, position, rows) == Shortfall(position, 0, 3)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_a_row_that_cannot_be_written_raises_once_naming_the_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.symlink_to("/dev/full")                                 # every write: ENOSPC
    writer = MetricsWriter(path)
    with pytest.raises(OSError) as raised:
        writer.write(row(1))
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(path)
    writer.close()                                               # the same failure is not raised a second time


def test_curves_png(tmp_path):
    rows = [row(s, loss=3 - s / 10) for s in range(1, 11)] + [row(5, "valid"), row(10, "valid"), row(10, "test")]
    plot_curves(rows, tmp_path / "curves.png", title="t")
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    plot_curves([], tmp_path / "empty.png")                      # nothing logged yet: still a valid image
    assert (tmp_path / "empty.png").stat().st_size > 0 and not list(tmp_path.glob("*.tmp"))


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_curves_that_cannot_be_written_raise_naming_the_file_and_leave_no_temporary(tmp_path):
    (tmp_path / "curves.png.tmp").symlink_to("/dev/full")        # the temporary file: ENOSPC
    with pytest.raises(OSError) as raised:
        plot_curves([row(1)], tmp_path / "curves.png")
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(tmp_path / "curves.png")
    assert os.listdir(tmp_path) == []


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
