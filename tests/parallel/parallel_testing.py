"""Helpers for the MPI tests: launch `mpiexec` as a subprocess, tiny models and data shared by the tests."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


def mpiexec_path():
    """The mpiexec next to this Python (the mpich wheel's), else the one on PATH, else None."""
    local = Path(sys.executable).parent / "mpiexec"
    return str(local) if local.exists() else shutil.which("mpiexec")


needs_mpiexec = pytest.mark.skipif(mpiexec_path() is None, reason="no mpiexec (pip install mpich)")


def clean_env(**extra):
    """The environment for a nested mpiexec: without the launcher variables of any job we run inside."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PMI_", "PMIX_", "MPIR_", "HYDRA_", "MPI_LOCALNRANKS", "MPI_LOCALRANKID",
                                "OMPI_", "SLURM_"))}
    env.update({"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}, **extra)
    return env


def run_mpiexec(n, args, timeout=60, cwd=None, **env):
    """Run `mpiexec -n N args...`; returns the CompletedProcess (raises TimeoutExpired on a hang)."""
    cmd = [mpiexec_path(), "-n", str(n), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd or REPO,
                          env=clean_env(**env))


def text(n_chars=2400, seed=0):
    """Deterministic pseudo-sentences for a tiny char-level corpus."""
    words = "the a cat dog sat on mat ran far and then it was good bad big small red fox jumps".split()
    rng = np.random.default_rng(seed)
    out = []
    while sum(map(len, out)) < n_chars:
        out.append(" ".join(words[k] for k in rng.integers(0, len(words), rng.integers(3, 9))) + ".\n")
    return "".join(out)[:n_chars]

