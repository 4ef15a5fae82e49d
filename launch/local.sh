#!/usr/bin/env bash
# Local mode: one process, CPU or one GPU. Runs `disttrain run` from the project's virtual environment.
#   launch/local.sh jobs/charlm.toml [--set section.key=value ...] [--out DIR] [--resume] [--device cpu|cuda]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${DISTTRAIN_PYTHON:-$root/.venv/bin/python}"
if [[ ! -x "$python" ]]; then
    echo "launch/local.sh: no virtual environment at $root/.venv (run 'make test' or 'make run' once to build it," \
         "or set DISTTRAIN_PYTHON)" >&2
    exit 1
fi
exec "$python" -m disttrain.cli.main run "$@"
