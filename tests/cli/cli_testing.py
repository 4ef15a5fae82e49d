"""Helpers for CLI tests: run `disttrain` as a process, read metrics.jsonl."""
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def disttrain_cmd(*args):
    return [sys.executable, "-m", "disttrain.cli.main", *map(str, args)]


def run_disttrain(*args, cwd=None, timeout=120, env=None):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(disttrain_cmd(*args), capture_output=True, text=True, cwd=cwd or REPO, timeout=timeout,
                          env=env)


# measurements of this process (clock, memory it happened to hold), not training results
MEASURED = ("time", "tokens_per_s", "peak_mem_bytes")


def metric_rows(run_dir):
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in MEASURED} for r in rows]
