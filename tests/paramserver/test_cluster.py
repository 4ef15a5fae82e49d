"""End to end: `ps-cluster` with CURVE keys, 2 servers and 4 async workers trains a tiny char LSTM."""
import json
import math
import subprocess
import sys

from disttrain.train.loop import Trainer


def test_ps_cluster_async_four_workers_trains(ps_job, tmp_path):
    spec, job = ps_job("data.batch_size=8", "train.epochs=2", n_chars=4000)
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "disttrain.paramserver.cli", "ps-cluster", str(job),
                           "--servers", "2", "--workers", "4", "--out", str(out)],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "CURVE" in proc.stderr and "final: valid ppl" in proc.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    valid = [r for r in rows if r["split"] == "valid"]
    local = Trainer(spec, out_dir=None, progress=False)
    local.fit()
    vocab = len(local.corpus.vocab)
    assert train[-1]["loss"] < train[0]["loss"] - 0.5 and valid[-1]["loss"] < 0.6 * math.log(vocab)  # learned
    assert valid[-1]["loss"] < 1.25 * local.evals["valid"].loss                     # near local training
    for name in ("curves.png", "config.toml", "checkpoints", "keys/server.key", "keys/clients/worker-3.key",
                 "ps-snapshots/server-0.snap", "ps-snapshots/server-1.snap", "logs/server-1.log"):
        assert (out / name).exists(), name
    for i in range(2):
        log = (out / "logs" / f"server-{i}.log").read_text()
        assert "CURVE" in log and "worker 3 joined" in log and "stopped after" in log
