#!/usr/bin/env bash
# Data-parallel training over MPI: N processes (ranks), each on B/N of every batch, gradients averaged by allreduce.
#
#   launch/mpirun.sh -n 2 jobs/charlm.toml [disttrain run options: --set k=v, --out DIR, --resume, --trace FILE]
#   launch/mpirun.sh -n 8 --hostfile launch/hostfile jobs/ptb_small.toml --out runs/ptb_small_dp8
#
# Runs `disttrain run JOB --set parallel.mode=data ...` under mpiexec: the project venv's (the `mpich` wheel,
# one machine) unless MPIEXEC names another (the cluster's MPI, with mpi4py built against it). Each rank gets
# cores-per-node / ranks-per-node BLAS threads unless OMP_NUM_THREADS is set. Extra mpiexec options: MPIEXEC_ARGS.
# The global batch [data] batch_size must be divisible by N. Pipeline mode: add --set parallel.mode=pipeline
# (a later --set wins; docs/RUNNING_MPI.md), e.g. launch/mpirun.sh -n 2 jobs/ptb_small_pipeline.toml --set parallel.mode=pipeline
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${DISTTRAIN_PYTHON:-$root/.venv/bin/python}"
mpiexec="${MPIEXEC:-$root/.venv/bin/mpiexec}"
usage="usage: launch/mpirun.sh -n N [--hostfile FILE] JOB.toml [disttrain run options]"

ranks="" hostfile=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        -n|-np) ranks="$2"; shift 2 ;;
        --hostfile|-hostfile|-f) hostfile="$2"; shift 2 ;;
        -h|--help) echo "$usage"; exit 0 ;;
        *) break ;;
    esac
done
if [[ -z "$ranks" || $# -lt 1 ]]; then echo "$usage" >&2; exit 2; fi
job="$1"; shift
for tool in "$python" "$mpiexec"; do
    if [[ ! -x "$tool" ]] && ! command -v "$tool" >/dev/null; then
        echo "launch/mpirun.sh: $tool not found (run 'make test' once to build .venv, or set DISTTRAIN_PYTHON / MPIEXEC)" >&2
        exit 1
    fi
done

# one BLAS thread per core: cores of this node / ranks on it (all ranks here when there is no hostfile)
per_node="$ranks"
if [[ -n "$hostfile" ]]; then
    nodes=$(grep -cv -e '^\s*#' -e '^\s*$' "$hostfile")
    per_node=$(( (ranks + nodes - 1) / nodes ))
fi
threads=$(( $(nproc) / per_node )); (( threads >= 1 )) || threads=1
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$threads}"
export OPENBLAS_NUM_THREADS="${OPENBLAS_NUM_THREADS:-$OMP_NUM_THREADS}" MKL_NUM_THREADS="${MKL_NUM_THREADS:-$OMP_NUM_THREADS}"
export PYTHONUNBUFFERED=1

args=(-n "$ranks")
[[ -n "$hostfile" ]] && args+=(-hostfile "$hostfile")
if "$mpiexec" --version 2>&1 | grep -qi -e "open mpi" -e "openrte"; then   # Open MPI forwards only what -x names
    args+=(-x OMP_NUM_THREADS -x OPENBLAS_NUM_THREADS -x MKL_NUM_THREADS -x PYTHONUNBUFFERED -x PATH)
fi
# shellcheck disable=SC2086
exec "$mpiexec" "${args[@]}" ${MPIEXEC_ARGS:-} "$python" -m disttrain.cli.main run "$job" --set parallel.mode=data "$@"
