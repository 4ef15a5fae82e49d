"""ssp never lets a worker run more than s clocks ahead (recorded clocks), with and without overlapped pushes;
async with 4 workers converges."""
import threading
import time

import numpy as np
import pytest

from disttrain.paramserver.protocol import encode, request
from disttrain.paramserver.sharding import Layout, ParamSpec
from disttrain.paramserver.worker import PSClient, PSError

from ps_testing import observer, raw_peer, running_servers, sgd_factory, wait_for


def _worker_threads(n, target):
    errors = []

    def run(k):
        try:
            target(k)
        except BaseException as exc:       # surfaced in the main thread below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(k,), daemon=True) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a worker thread hung"
    if errors:
        raise errors[0]


@pytest.mark.parametrize("staleness,overlap", [(0, False), (2, False), (1, True), (2, True)])
def test_ssp_bound_is_never_exceeded(staleness, overlap):
    """Checked twice: by the servers' records of answered reads, and by what each worker computes with. Worker k
    pushes the one-hot gradient e_k into `count` (SGD, lr 1), so -count[j] is how many of worker j's pushes
    the values hold; ssp promises that step n computes with at least n - 1 - s pushes of every worker.
    overlap: each push reads ahead (the worker computes its next step before it installs the answer)."""
    layout = Layout([ParamSpec("w", (50,), "<f4"), ParamSpec("b", (7,), "<f4"), ParamSpec("count", (3,), "<f4")], 2)
    initial = [np.zeros(50, "<f4"), np.zeros(7, "<f4"), np.zeros(3, "<f4")]
    delays, steps = (0.03, 0.01, 0.0), 20
    too_stale = []
    with running_servers(layout, initial, sgd_factory(lr=1.0, momentum=0.0),
                         {"consistency": "ssp", "staleness": staleness}) as (servers, endpoints):
        def work(k):
            client = PSClient(endpoints, layout, k, heartbeat_interval=0.2)
            targets = [np.zeros(50, "<f4"), np.zeros(7, "<f4"), np.zeros(3, "<f4")]
            client.connect(targets)
            client.pull()
            grads = [np.full(50, 1.0, "<f4"), np.full(7, 1.0, "<f4"), np.eye(3, dtype="<f4")[k]]
            pending = None
            for n in range(1, steps + 1):
                time.sleep(delays[k])                             # "compute" step n with `targets`
                if -targets[2].max() < n - 1 - staleness:
                    too_stale.append((k, n, (-targets[2]).tolist()))
                if not overlap:
                    client.push(grads, pull=True)
                    continue
                if pending is not None:
                    client.wait(pending)
                pending = client.push_async(grads, pull=True, ahead=True)
            if pending is not None:
                client.wait(pending)
            client.leave()
            client.close()

        _worker_threads(3, work)
    assert too_stale == []
    for server in servers:
        leads = [clock - slowest for _, clock, slowest in server.reads]
        assert len(server.reads) >= 3 * steps - 3
        assert max(leads) <= staleness                       # the bound holds for every answered read
        assert server.max_lead == staleness                  # ... and was reached: fast workers did wait
        assert server.deferred > 0
        assert server.updates == 3 * steps


@pytest.mark.parametrize("config", [{"consistency": "sync"}, {"consistency": "ssp", "staleness": 0}])
def test_read_ahead_is_refused_where_it_would_wait_on_itself(config):
    layout = Layout([ParamSpec("w", (5,), "<f4")], 1)
    with running_servers(layout, [np.zeros(5, "<f4")], sgd_factory(lr=0.1, momentum=0.0),
                         {**config, "expect_workers": 1}) as (servers, endpoints):
        client = PSClient(endpoints, layout, 0, heartbeat_interval=0.2)
        client.connect([np.zeros(5, "<f4")])
        with pytest.raises(PSError, match="need async or ssp with staleness >= 1") as info:
            client.push([np.ones(5, "<f4")], pull=True, ahead=True)
        assert info.value.code == "bad_mode"
        assert servers[0].updates == 0
        client.close()


def test_a_read_ahead_counts_as_a_read_one_clock_later():
    """ssp, staleness 1, one worker: its push moves it to clock 1 and the read ahead counts at clock 2, one
    ahead of the slowest worker (itself): answered at once. Counted at 3, it would wait on itself."""
    layout = Layout([ParamSpec("w", (5,), "<f4")], 1)
    with running_servers(layout, [np.zeros(5, "<f4")], sgd_factory(lr=0.1, momentum=0.0),
                         {"consistency": "ssp", "staleness": 1, "expect_workers": 1}) as ((server,), endpoints):
        client = PSClient(endpoints, layout, 0, heartbeat_interval=0, reconnect_timeout=10.0)
        client.connect([np.zeros(5, "<f4")])
        client.push([np.ones(5, "<f4")], pull=True, ahead=True)
        assert server.reads[-1] == [0, 2, 1] and server.deferred == 0
        client.close()


def test_a_held_back_read_is_counted_once_and_only_ssp_reads_are_recorded():
    """ssp, staleness 0: worker 0's read after its push waits for worker 1's push (one deferred read, one
    recorded read); an observer's reads, and every read in async mode, leave no record."""
    layout = Layout([ParamSpec("w", (5,), "<f4")], 1)
    ones = [np.ones(5, "<f4")]
    with running_servers(layout, [np.zeros(5, "<f4")], sgd_factory(lr=0.1, momentum=0.0),
                         {"consistency": "ssp", "staleness": 0, "expect_workers": 2}) as ((server,), endpoints):
        with raw_peer(endpoints[0]) as first, raw_peer(endpoints[0]) as second:
            first.join(layout, 0)
            second.join(layout, 1)
            first.send(encode(request("push", first.next_seq(), worker=0, clock=0, keys=[0], pull=True), ones))
            wait_for(lambda: server.deferred > 0, "the read to be held back")
            assert second.request("push", ones, worker=1, clock=0, keys=[0])["op"] == "ok"
            assert first.reply()["op"] == "params"
        watcher = observer(endpoints, layout)
        watcher.pull()
        watcher.close()
        assert server.deferred == 1 and server.reads == [[0, 1, 1]]
    with running_servers(layout, [np.zeros(5, "<f4")], sgd_factory(lr=0.1, momentum=0.0),
                         {"consistency": "async"}) as ((server,), endpoints):
        client = PSClient(endpoints, layout, 0, heartbeat_interval=0)
        client.connect([np.zeros(5, "<f4")])
        client.push(ones, pull=True)
        assert server.reads == [] and server.max_lead == 0
        client.close()


def test_a_read_held_back_longer_than_the_server_timeout_is_waited_for_while_heartbeats_answer():
    """ssp, staleness 0: worker 0's read waits three server time-outs for worker 1's push. The server answers
    worker 0's heartbeats meanwhile, so worker 0 knows it is alive and does not reconnect."""
    layout = Layout([ParamSpec("w", (5,), "<f4")], 1)
    ones = [np.ones(5, "<f4")]
    with running_servers(layout, [np.zeros(5, "<f4")], sgd_factory(lr=0.1, momentum=0.0),
                         {"consistency": "ssp", "staleness": 0, "expect_workers": 2}) as ((server,), endpoints):
        waiting, late = (PSClient(endpoints, layout, k, heartbeat_interval=0.1, server_timeout=2.0) for k in (0, 1))
        waiting.connect([np.zeros(5, "<f4")])
        late.connect([np.zeros(5, "<f4")])

        def push_late():
            wait_for(lambda: server.deferred > 0, "the read to be held back")
            time.sleep(6.0)
            late.push(ones, pull=False)

        pusher = threading.Thread(target=push_late, daemon=True)
        pusher.start()
        waiting.push(ones, pull=True)
        pusher.join(timeout=60)
        assert waiting.reconnects == 0 and server.updates == 2
        for client in (waiting, late):
            client.close()


def test_async_four_workers_converge():
    """Least squares y = X w*: four workers, each with its own data, push with overlap and never wait."""
    rng = np.random.default_rng(0)
    dim, per_worker = 20, 64
    w_true = rng.standard_normal(dim)
    data = []
    for _ in range(4):
        x = rng.standard_normal((per_worker, dim))
        data.append((x, x @ w_true))
    layout = Layout([ParamSpec("w", (dim,), "<f8")], 2, limit=8)          # w cut into parts on 2 servers
    initial = [np.zeros(dim)]
    losses = {}
    with running_servers(layout, initial, sgd_factory(lr=0.02, momentum=0.0),
                         {"consistency": "async"}) as (servers, endpoints):
        def work(k):
            x, y = data[k]
            w = np.zeros(dim)
            client = PSClient(endpoints, layout, k, heartbeat_interval=0.2)
            client.connect([w])
            pending = None
            for step in range(200):
                batch = rng_k[k].integers(0, per_worker, 16)
                grad = x[batch].T @ (x[batch] @ w - y[batch]) / len(batch)
                if pending is not None:
                    client.wait(pending)                          # install the answer to the previous push
                pending = client.push_async([grad], pull=True)    # and overlap this one with the next step
            client.wait(pending)
            client.pull()
            losses[k] = float(np.mean((x @ w - y) ** 2))
            client.leave()
            client.close()

        rng_k = [np.random.default_rng(10 + k) for k in range(4)]
        _worker_threads(4, work)
        updates = [s.updates for s in servers]
    initial_loss = float(np.mean([np.mean(y ** 2) for _, y in data]))
    assert updates == [800, 800]
    assert max(losses.values()) < 1e-3 * initial_loss
