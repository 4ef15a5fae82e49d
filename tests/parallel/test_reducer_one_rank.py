"""A Reducer over one rank has nothing to overlap: no progress thread, no overlap="auto" trials, whatever it is
asked (the many-rank cases: tests/mpi/test_reducer_modes.py)."""
import pytest

import disttrain as dt
from disttrain import nn
from disttrain.parallel import world
from disttrain.parallel.buckets import Reducer


@pytest.mark.parametrize("progress", ["thread", "hooks"])
@pytest.mark.parametrize("overlap", [True, False, "auto"])
def test_one_rank_uses_no_thread_and_no_trials(progress, overlap):
    comm = world()
    assert comm.size == 1
    dt.manual_seed(0)
    reducer = Reducer(list(nn.Linear(3, 2).named_parameters()), comm, progress=progress, overlap=overlap)
    try:
        assert reducer.progress == "hooks" and reducer.choice is None
    finally:
        reducer.close()
