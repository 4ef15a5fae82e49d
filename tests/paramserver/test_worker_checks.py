"""A worker's own checks and bookkeeping: the arrays it pulls into must be ones the pull can fill in place (else
they are refused by name); leaving a server it is no longer a member of does not join it again."""
import re

import numpy as np
import pytest

from disttrain.paramserver.sharding import Layout, ParamSpec
from disttrain.paramserver.worker import PSClient

from ps_testing import running_servers, sgd_factory

LAYOUT = Layout([ParamSpec("w", (40,), "<f4"), ParamSpec("b", (6,), "<f4")], 1)


def read_only():
    array = np.zeros(40, "<f4")
    array.flags.writeable = False
    return array


@pytest.mark.parametrize("bad", [np.zeros((4, 10), "<f4"), np.zeros(41, "<f4"), np.zeros(40, "<f8"), read_only(),
                                 np.zeros(80, "<f4")[::2]],
                         ids=["2-D", "size", "dtype", "read-only", "strided"])
def test_a_target_the_pull_cannot_fill_in_place_is_refused(bad):
    client = PSClient(["tcp://127.0.0.1:9"], LAYOUT, 0)
    try:
        expected = f"target for w: need a writable contiguous 1-D <f4 array of 40 elements, got {bad.dtype.str} " \
                   f"shape {bad.shape}"
        with pytest.raises(ValueError, match=re.escape(expected)):
            client.set_targets([bad, np.zeros(6, "<f4")])
        with pytest.raises(ValueError, match="1 target arrays for 2 parameters"):
            client.set_targets([np.zeros(40, "<f4")])
        client.set_targets([np.zeros(40, "<f4"), np.zeros(6, "<f4")])
    finally:
        client.close()


def test_leaving_again_is_no_reason_to_join_again():
    """The server answers the second leave `not_joined`; the worker takes that as done, not as a lost server."""
    with running_servers(LAYOUT, [np.zeros(40, "<f4"), np.zeros(6, "<f4")], sgd_factory()) as ((server,), endpoints):
        client = PSClient(endpoints, LAYOUT, 0, heartbeat_interval=0)
        client.connect([np.zeros(40, "<f4"), np.zeros(6, "<f4")])
        client.leave()
        client.leave()
        assert client.reconnects == 0 and not server.membership.workers
        client.close()
