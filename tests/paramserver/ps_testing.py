"""Helpers for parameter-server tests: servers in threads on 127.0.0.1, small models, tiny char-level jobs.

Every server here binds tcp://127.0.0.1:0 (a free loopback port) and every wait is bounded, so each test stops
by itself even when something is broken.
"""
import threading
import time
from contextlib import contextmanager

import msgpack
import numpy as np
import zmq

import disttrain as dt
from disttrain import nn, optim
from disttrain.paramserver.protocol import decode_reply, encode, request
from disttrain.paramserver.server import ParameterServer, ServerConfig
from disttrain.paramserver.sharding import Layout
from disttrain.paramserver.job import run_worker, server_from_spec
from disttrain.paramserver.worker import PSClient
from disttrain.train.build import Schedules


def make_mlp(seed=0, dtype="float64"):
    dt.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 24), nn.Tanh(), nn.Linear(24, 3))
    return model.double() if dtype == "float64" else model


def sgd_factory(lr=0.1, momentum=0.9, **kw):
    def make(params):
        return optim.SGD(params, lr=lr, momentum=momentum, **kw), Schedules()
    return make


def adam_factory(lr=0.01, **kw):
    def make(params):
        return optim.Adam(params, lr=lr, **kw), Schedules()
    return make


@contextmanager
def running_servers(layout, initial, make_optimizer, config=None, securities=None, snapshot_paths=None):
    """Start layout.num_servers servers in threads; yields (servers, endpoints); stops them on exit."""
    servers = []
    for i in range(layout.num_servers):
        cfg = ServerConfig(**{**(config or {}), "log_every": 0})
        if snapshot_paths is not None:
            cfg.snapshot_path = snapshot_paths[i]
        security = securities[i] if securities is not None else None
        servers.append(ParameterServer(i, layout, initial, make_optimizer, cfg, security=security,
                                       log=lambda text: None))
    with serving(servers) as endpoints:
        yield servers, endpoints


@contextmanager
def serving_job(spec, num_servers):
    """The job's servers (server_from_spec) in threads; yields (servers, endpoints)."""
    servers = [server_from_spec(spec, i, log=lambda text: None) for i in range(num_servers)]
    with serving(servers) as endpoints:
        yield servers, endpoints


@contextmanager
def serving(servers):
    """Start the servers, serve each in a thread; yields their endpoints; stops them on exit."""
    endpoints = [s.start() for s in servers]
    stop = threading.Event()
    threads = [threading.Thread(target=s.serve, kwargs={"stop_event": stop}, daemon=True) for s in servers]
    for t in threads:
        t.start()
    try:
        yield endpoints
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=10)
            assert not t.is_alive(), "a server thread did not stop"


def train_worker_0(spec, num_servers, **options):
    """Worker 0 of the job (run_worker, `options` passed on) against the job's servers in threads; returns
    (its Trainer, the servers, the evals it returned)."""
    captured = {}
    with serving_job(spec, num_servers) as (servers, endpoints):
        evals = run_worker(spec, 0, endpoints, progress=False, on_trainer=lambda tr: captured.setdefault("t", tr),
                           **options)
    return captured["t"], servers, evals


@contextmanager
def worker_clients(endpoints, layout, models):
    """Worker k's PSClient for each models[k], joined with that model's parameters as its targets; they leave
    and close on exit."""
    clients = [PSClient(endpoints, layout, k, heartbeat_interval=0.2) for k in range(len(models))]
    try:
        for c, m in zip(clients, models):
            c.connect(flat_targets(m.parameters()))
        yield clients
    finally:
        for c in clients:
            if c.links[0].joined:
                c.leave()
            c.close()


def flat_targets(params):
    return [p.data.reshape(-1) for p in params]


def flat_grads(params):
    return [np.ascontiguousarray(p.grad.data).reshape(-1) for p in params]


def observer(endpoints, layout, worker_id=60000, security=None):
    """A read-only client (monitoring) connected to every server; close() it when done."""
    client = PSClient(endpoints, layout, worker_id, security=security, observer=True, server_timeout=5.0,
                      reconnect_timeout=5.0)
    targets = [np.zeros(p.size, dtype=p.dtype) for p in layout.params]
    return client.connect(targets, timeout=5.0)




def layout_of(model, num_servers):
    return Layout.from_named_arrays(model.named_parameters(), num_servers)


class RawPeer:
    """A hand-driven DEALER connection to one server: sends any frames, reads one decoded reply at a time.

    Every wait is bounded: reply() fails the test when the server does not answer within `wait_ms`.
    """

    def __init__(self, endpoint, security=None, wait_ms=10_000):
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.DEALER)
        self.socket.linger = 0
        if security is not None:
            security.apply(self.socket)
        self.socket.connect(endpoint)
        self.wait_ms = wait_ms
        self.seq = 0

    def next_seq(self):
        self.seq += 1
        return self.seq

    def send(self, frames):
        self.socket.send_multipart([bytes(f) if not isinstance(f, bytes) else f for f in frames])

    def reply(self):
        assert self.socket.poll(self.wait_ms), "the server did not answer"
        return decode_reply(self.socket.recv_multipart())[0]

    def ask(self, frames):
        self.send(frames)
        return self.reply()

    def request(self, op, arrays=None, **fields):
        """Send a request built from fields (and arrays); returns the reply header."""
        return self.ask(encode(request(op, self.next_seq(), **fields), arrays))

    def raw(self, header, frames=()):
        """Send a hand-packed header (anything msgpack packs) and raw frames; returns the reply header."""
        return self.ask([msgpack.packb(header), *frames])

    def join(self, layout, worker, **fields):
        return self.request("join", worker=worker, clock=0, fingerprint=layout.fingerprint, **fields)

    def close(self):
        self.socket.close()
        self.context.term()


@contextmanager
def raw_peer(endpoint, security=None):
    peer = RawPeer(endpoint, security)
    try:
        yield peer
    finally:
        peer.close()


def nested(depth, leaf=0):
    """A list nested `depth` levels deep around `leaf`."""
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


def wait_for(condition, what, timeout=60):
    """Poll `condition` until it holds; fails the test after `timeout` seconds, naming `what` it waited for."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)
