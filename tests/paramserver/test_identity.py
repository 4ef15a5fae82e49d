"""Who may act as whom: under CURVE a key joins only as the worker its name says; heartbeats and pushes count only
on the connection that joined; stats only for a joined connection or the admin key."""
import time

import numpy as np
import pytest

from disttrain.paramserver.auth import ClientSecurity, ServerSecurity, generate_keys
from disttrain.paramserver.sharding import Layout, ParamSpec
from disttrain.paramserver.worker import PSClient

from ps_testing import raw_peer, running_servers, sgd_factory

LAYOUT = Layout([ParamSpec("w", (16,), "<f4")], 1)
INITIAL = [np.zeros(16, "<f4")]
TIMEOUT = 1.0


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    return generate_keys(tmp_path_factory.mktemp("keys"), ["worker-0", "worker-1", "admin", "monitor"])


@pytest.fixture
def curve_server(keys):
    with running_servers(LAYOUT, INITIAL, sgd_factory(), {"heartbeat_timeout": TIMEOUT},
                         securities=[ServerSecurity(keys)]) as ((server,), endpoints):
        yield server, endpoints[0]


def key(keys, name):
    return ClientSecurity.from_dir(keys, name)


def test_a_worker_key_joins_only_as_its_own_worker(keys, curve_server):
    server, endpoint = curve_server
    with raw_peer(endpoint, key(keys, "worker-0")) as owner, raw_peer(endpoint, key(keys, "worker-1")) as other:
        assert owner.join(LAYOUT, 0)["op"] == "joined"
        reply = other.join(LAYOUT, 0)                                 # a takeover of worker 0's session
        assert reply["code"] == "forbidden" and "worker-1 may join only as worker 1" in reply["message"]
        assert other.join(LAYOUT, 0, observer=True)["code"] == "forbidden"
        assert server.membership.get(0).identity != b"" and other.join(LAYOUT, 1)["op"] == "joined"
        assert owner.request("push", [np.ones(16, "<f4")], worker=0, clock=0, keys=[0])["op"] == "ok"
        reply = other.request("push", [np.ones(16, "<f4")], worker=0, clock=1, keys=[0])
        assert reply["code"] == "wrong_connection"
    assert server.updates == 1


def test_other_keys_only_observe_and_only_admin_reads_stats_unjoined(keys, curve_server):
    server, endpoint = curve_server
    with raw_peer(endpoint, key(keys, "admin")) as admin, raw_peer(endpoint, key(keys, "monitor")) as monitor:
        assert admin.request("stats")["op"] == "stats"
        assert admin.join(LAYOUT, 5)["code"] == "forbidden"
        assert monitor.request("stats")["code"] == "forbidden"
        assert monitor.join(LAYOUT, 60000)["code"] == "forbidden"
        assert monitor.join(LAYOUT, 60000, observer=True)["op"] == "joined"
        assert monitor.request("stats")["op"] == "stats"
    with raw_peer(endpoint, key(keys, "worker-1")) as worker:
        assert worker.request("stats")["code"] == "forbidden"
        worker.join(LAYOUT, 1)
        assert worker.request("stats")["stats"]["clocks"] == {"1": 0}


def test_heartbeats_from_another_connection_do_not_keep_a_worker_alive():
    with running_servers(LAYOUT, INITIAL, sgd_factory(), {"heartbeat_timeout": TIMEOUT}) as ((server,), endpoints), \
            raw_peer(endpoints[0]) as silent, raw_peer(endpoints[0]) as spoofer:
        assert silent.join(LAYOUT, 4)["op"] == "joined"
        deadline = time.monotonic() + 30 * TIMEOUT
        while 4 not in server.membership.dropped:
            assert time.monotonic() < deadline, "a worker kept alive by another connection's heartbeats"
            assert spoofer.request("heartbeat", worker=4)["code"] in ("wrong_connection", "not_joined")
            time.sleep(TIMEOUT / 5)
        assert spoofer.request("stats")["code"] == "forbidden"       # not joined: no stats either


def test_a_computing_worker_stays_live_through_heartbeats_on_its_own_connection(keys, curve_server):
    server, endpoint = curve_server
    client = PSClient([endpoint], LAYOUT, 1, security=key(keys, "worker-1"), heartbeat_interval=TIMEOUT / 5,
                      server_timeout=10 * TIMEOUT)
    try:
        client.connect([np.zeros(16, "<f4")], timeout=10)
        time.sleep(4 * TIMEOUT)                                      # "computing": no requests
        client.push([np.ones(16, "<f4")], pull=True)
        assert client.reconnects == 0 and server.membership.dropped == [] and server.updates == 1
        assert client.stats(0)["clocks"] == {"1": 1}
    finally:
        client.close()
