#!/usr/bin/env bash
# Parameter-server cluster on this machine: CURVE keys, S servers, W workers (worker 0 shows progress).
#
#   launch/ps_cluster.sh [JOB.toml] [--servers S] [--workers W] [--out DIR] [--resume | --overwrite] [--insecure]
#                        [--set k=v ...]
#
# Defaults: jobs/charlm_ps.toml, and S and W from the job's [ps] section. Outputs in DIR (default runs/<job>):
# metrics.jsonl, curves.png, checkpoints/ (worker 0), keys/, ps-snapshots/, logs/ (servers and other workers).
# Servers listen on 127.0.0.1 only; for several hosts see launch/ps_multihost.md.
# An output directory holding an earlier run is refused unless --resume (continue it) or --overwrite (start over).
# Each process gets cores / (S + W) BLAS threads unless OMP_NUM_THREADS is set. Python: $DISTTRAIN_PYTHON,
# else the checkout's .venv; run with -P (-I before Python 3.11), so a `disttrain` folder in the current
# directory is never imported in place of the installed one.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${DISTTRAIN_PYTHON:-$root/.venv/bin/python}"
if [[ ! -x "$python" ]]; then
    echo "launch/ps_cluster.sh: $python not found; run 'make run' (it creates .venv) or set DISTTRAIN_PYTHON" >&2
    exit 2
fi
job="$root/jobs/charlm_ps.toml"
if [[ $# -gt 0 && "$1" != -* ]]; then
    job="$1"
    shift
fi
safe_path=-P
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || safe_path=-I
exec "$python" "$safe_path" -m disttrain.paramserver.cli ps-cluster "$job" "$@"
