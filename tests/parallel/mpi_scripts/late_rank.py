"""Rank 1 arrives 60 s late at DataParallel's start-up model check; rank 0's wait is bounded by 3 s.

    mpiexec -n 2 python late_rank.py
"""
import time

import disttrain as dt
from disttrain import nn
from disttrain.parallel import DataParallel, world

comm = world()
comm.set_timeout(3)
dt.manual_seed(0)
model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))
if comm.rank == 1:
    time.sleep(60)
DataParallel(model, comm)
print(f"rank {comm.rank} got past the model check", flush=True)
