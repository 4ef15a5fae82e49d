"""Rank 1 builds a wider model than the others: every rank must raise ModelMismatchError (none may hang).

    mpiexec -n N python mismatched_model.py OUT_DIR      # each rank writes OUT_DIR/rank<r>.txt: the message
"""
import sys
from pathlib import Path

from disttrain import nn
from disttrain.parallel import DataParallel, ModelMismatchError, world

comm = world()
hidden = 9 if comm.rank == 1 else 8
try:
    DataParallel(nn.Sequential(nn.Linear(3, hidden), nn.Linear(hidden, 2)), comm)
except ModelMismatchError as exc:
    (Path(sys.argv[1]) / f"rank{comm.rank}.txt").write_text(str(exc))
