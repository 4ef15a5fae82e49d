"""A push that is sent again is applied exactly once, whichever side notices the repeat.

- The server: a worker whose reply was lost sends the same push again on its connection (the same clock);
  the server, which already counted that clock, answers it as it answered the first and applies nothing.
- The worker (PSClient): a reply lost on the way back makes the client give up on the request, reconnect and
  rejoin; the server's clock for it then says the push was counted, so the client does not send it again.
"""
import threading

import msgpack
import numpy as np
import pytest
import zmq

from disttrain.paramserver.protocol import decode_reply, encode, peek_seq, request
from disttrain.paramserver.sharding import Layout, ParamSpec
from disttrain.paramserver.worker import PSClient

from ps_testing import observer, running_servers, sgd_factory

LAYOUT = Layout([ParamSpec("w", (40,), "<f4"), ParamSpec("b", (6,), "<f4")], 1)
INITIAL = [np.linspace(-1, 1, 40, dtype="<f4"), np.arange(6, dtype="<f4")]
LR = 0.25
ME = 7


def gradients(seed):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(p.size).astype(p.dtype) for p in LAYOUT.params]


def after(*pushes):
    """The parameters after plain SGD (lr LR, no momentum) applied each push in turn: what the server must hold."""
    out = [a.copy() for a in INITIAL]
    for grads in pushes:
        for value, g in zip(out, grads):
            value -= np.float32(LR) * g
    return out


def read_parameters(endpoints):
    watcher = observer(endpoints, LAYOUT)
    try:
        watcher.pull()
        return [t.copy() for t in watcher.targets]
    finally:
        watcher.close()


def assert_parameters(got, want):
    for name, g, w in zip(("w", "b"), got, want):
        np.testing.assert_array_equal(g, w, err_msg=name)


def serve(consistency):
    return running_servers(LAYOUT, INITIAL, sgd_factory(lr=LR, momentum=0.0), {"consistency": consistency})


# ------------------------------------------------------------------------------------------ the server's half

class RawWorker:
    """Worker ME on one DEALER connection, speaking the protocol directly (no retry logic of its own)."""

    def __init__(self, ctx, endpoint):
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.connect(endpoint)
        self.seq = 0

    def ask(self, header_fields, op, arrays=None):
        self.seq += 1
        self.sock.send_multipart(encode(request(op, self.seq, **header_fields), arrays))
        assert self.sock.poll(10_000), f"no answer to {op}"
        header, arrays = decode_reply(self.sock.recv_multipart())
        assert header["seq"] == self.seq
        return header, [np.array(a) for a in arrays or ()]

    def close(self):
        self.sock.close()


@pytest.mark.parametrize("consistency", ["async", "sync"])
@pytest.mark.parametrize("pull", [False, True])
def test_server_answers_a_resent_push_without_applying_it_again(consistency, pull):
    grads, later = gradients(1), gradients(2)
    with serve(consistency) as ((server,), endpoints):
        ctx = zmq.Context()
        worker = RawWorker(ctx, endpoints[0])
        try:
            joined, _ = worker.ask({"worker": ME, "clock": 0, "fingerprint": LAYOUT.fingerprint}, "join")
            assert joined["op"] == "joined" and joined["clock"] == 0
            push = {"worker": ME, "clock": 0, "keys": [0, 1], "pull": pull}
            first, first_arrays = worker.ask(push, "push", grads)     # applied; its reply is "lost": sent again
            again, again_arrays = worker.ask(push, "push", grads)
            assert again["op"] == first["op"] == ("params" if pull else "ok"), again
            assert again["clock"] == first["clock"] == 1
            assert server.updates == 1
            assert_parameters(again_arrays, first_arrays)
            assert_parameters(read_parameters(endpoints), after(grads))
            # the worker goes on from the clock the server gave it: the next push is a new one
            nxt, _ = worker.ask({**push, "clock": 1}, "push", later)
            assert nxt["op"] != "error" and nxt["clock"] == 2 and server.updates == 2
            assert_parameters(read_parameters(endpoints), after(grads, later))
        finally:
            worker.close()
            ctx.term()


# ------------------------------------------------------------------------------------------ the worker's half

class ReplyDropper:
    """A loopback relay between PSClients and one server that loses the replies to the first `drop` pushes.

    Clients connect to `endpoint`; the relay speaks to the server on one DEALER connection and routes each
    reply back to the client connection that sent the request with that seq."""

    def __init__(self, server_endpoint, drop=1):
        self.server_endpoint, self.drop, self.dropped = server_endpoint, drop, 0
        self.endpoint = None
        self._ready, self._stop = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        assert self._ready.wait(10), "the relay did not start"
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=10)
        assert not self._thread.is_alive(), "the relay did not stop"

    def _run(self):
        ctx = zmq.Context()
        front, back = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
        front.linger = back.linger = 0
        front.bind("tcp://127.0.0.1:0")
        back.connect(self.server_endpoint)
        self.endpoint = front.getsockopt_string(zmq.LAST_ENDPOINT)
        self._ready.set()
        sender, pushes = {}, set()                   # seq -> client identity; seqs of pushes
        poller = zmq.Poller()
        poller.register(front, zmq.POLLIN)
        poller.register(back, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                ready = dict(poller.poll(50))
                if front in ready:
                    identity, *body = front.recv_multipart()
                    seq = peek_seq(body)
                    sender[seq] = identity
                    if msgpack.unpackb(body[0])["op"] == "push":
                        pushes.add(seq)
                    back.send_multipart(body)
                if back in ready:
                    body = back.recv_multipart()
                    seq = decode_reply(body)[0]["seq"]
                    if seq in pushes and self.dropped < self.drop:
                        self.dropped += 1                # the server applied it; the worker never hears so
                        continue
                    front.send_multipart([sender.pop(seq), *body])
        finally:
            front.close()
            back.close()
            ctx.term()


@pytest.mark.parametrize("pull", [False, True])
def test_worker_does_not_resend_a_push_the_server_counted(pull):
    grads, later = gradients(1), gradients(2)
    with serve("async") as ((server,), endpoints), ReplyDropper(endpoints[0]) as relay:
        targets = [np.zeros(p.size, p.dtype) for p in LAYOUT.params]
        # no heartbeats: the lost reply is noticed by the plain time-out, then the client rejoins
        client = PSClient([relay.endpoint], LAYOUT, ME, heartbeat_interval=0, server_timeout=0.5,
                          reconnect_timeout=30.0)
        try:
            client.connect(targets, timeout=30)
            client.push(grads, pull=pull)
            assert relay.dropped == 1 and client.reconnects >= 1
            assert server.updates == 1
            if pull:                                  # the read of the push is still answered
                assert_parameters(targets, after(grads))
            client.push(later, pull=True)             # and the next push is a new one
            assert server.updates == 2
            assert_parameters(targets, after(grads, later))
        finally:
            client.close()
