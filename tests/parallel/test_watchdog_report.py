"""The watchdog's one-line report, from the positions the live ranks sent (no MPI needed)."""
import json

import pytest

from disttrain import trace
from disttrain.parallel.watchdog import describe_expiry, encode_position, operation


def position(rank, what, key, waited=10.0):
    return {"rank": rank, "what": what, "key": list(key), "waited": waited}


def test_a_timed_out_rank_names_who_did_not_arrive_and_who_waits_with_it():
    mine = position(0, "allreduce of gradient bucket 2 on world (step 7)", ("world", 41))
    positions = {0: mine, 2: position(2, mine["what"], ("world", 41)),
                 3: position(3, "broadcast of the loss on world/1:0 (step 7)", ("world/1:0", 9), waited=12.5)}
    line = describe_expiry(mine, (0, 1, 2, 3), positions, 4, 10, 2)
    assert line == ("[rank 0 of 4] watchdog: allreduce of gradient bucket 2 on world (step 7) did not complete within "
                    "10 s ([parallel] timeout_s); not arrived: rank 1 (no answer within 2 s: stopped, hung, busy or "
                    "dead); rank 3 (waiting 12.5 s in broadcast of the loss on world/1:0 (step 7)); waiting in it "
                    "too: rank 2. Aborting the job.")


def test_a_rank_that_heard_of_a_time_out_says_whose_and_where_it_waits():
    notice = position(1, "stage 1 receive of micro-batch 0's activation from stage 0", ("pipe", "p2p", 0, 1, 0))
    mine = position(2, "barrier on world", ("world", 3), waited=4.25)
    line = describe_expiry(mine, (0, 1, 2), {1: notice, 2: mine}, 3, 300, 10, notice=notice)
    assert line.startswith("[rank 2 of 3] watchdog: rank 1 timed out in stage 1 receive of micro-batch 0's "
                           "activation from stage 0; this rank has waited 4.2 s in barrier on world; not arrived: "
                           "rank 0 (no answer within 10 s")
    assert "rank 1 (waiting 10.0 s in stage 1 receive" in line


def test_operations_say_where_the_run_was():
    trace.set_step(12)
    try:
        assert operation("allreduce", ("world", 1)).label() == "allreduce (step 12)"
        with trace.phase("eval valid"):
            assert operation("allreduce").label() == "allreduce (eval valid after step 12)"
    finally:
        trace._state.step = None


@pytest.mark.parametrize("what", ["allreduce of bucket " + "x" * 5000, "broadcast of " + "é\u2028" * 3000])
def test_a_long_operation_name_still_travels_as_whole_json(what):
    position = {"rank": 3, "what": what, "key": [7, 1], "waited": 300.5}
    data = encode_position(position)
    assert len(data) <= 2048
    got = json.loads(data.decode())
    assert got["rank"] == 3 and got["key"] == [7, 1] and got["waited"] == 300.5
    assert got["what"].endswith("...") and what.startswith(got["what"][:-3])
