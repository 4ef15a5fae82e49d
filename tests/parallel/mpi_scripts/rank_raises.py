"""Rank 1 raises while the others wait in a collective: abort_on_error must end the whole job."""
import time

import numpy as np

from disttrain.parallel import abort_on_error, world

with abort_on_error(world()) as comm:
    if comm.rank == 1:
        time.sleep(0.2)
        raise RuntimeError("boom on rank 1")
    comm.Allreduce(np.ones(4))            # never completes: rank 1 is gone
    print("rank 0 got past the allreduce", flush=True)
