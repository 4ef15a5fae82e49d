"""PSClient: a worker's connection to all S servers — join, pull, push, heartbeats, reconnection.

    client = PSClient(endpoints, layout, worker_id=3, security=ClientSecurity.from_dir("keys", "worker-3"))
    client.connect(targets)                # join every server; targets: one flat writable array per parameter
    client.pull()                          # copy the current parameters into targets
    client.push(grads, pull=True)          # send gradients (one flat array per parameter), read the update back
    handle = client.push_async(grads)      # ... compute the next step while the push travels ...
    client.wait(handle)                    # then install what came back
    client.leave(); client.close()

Each request goes to every server at once (each gets its own parts) and the client waits for all replies, so
the S servers work in parallel. Gradients are sent straight from their memory (copy=False): the caller must
not change them until the push's wait() returns. Replies are checked (keys, dtypes, shapes) before anything is
copied into `targets`.

NOTE (faults): a background thread sends a heartbeat to every server each `heartbeat_interval` seconds on its
own sockets, which keeps this worker live on the servers while it computes and tells the client whether each
server is alive and which incarnation it is. A request whose server restarted (new incarnation, or "not
joined") or fell silent for `server_timeout` is retried after a reconnect: a new socket, a new join (the server
says which clock it has for us), and the request again — a push whose clock the server had already counted is
not sent twice. A server that stays away longer than `reconnect_timeout` raises ServerUnavailable.
"""
import itertools
import threading
import time

import numpy as np
import zmq

from disttrain.paramserver import protocol
from disttrain.paramserver.protocol import ProtocolError

__all__ = ["PSError", "ServerUnavailable", "PSClient", "Handle"]

_REJOIN_CODES = ("not_joined", "wrong_connection", "bad_clock")
_MAX_RETRIES = 8


class PSError(RuntimeError):
    """A server refused a request (`code` says why) or answered outside the protocol."""

    def __init__(self, code, message, server=None):
        super().__init__(f"server {server}: {message} [{code}]" if server is not None else f"{message} [{code}]")
        self.code, self.server = code, server


class ServerUnavailable(PSError):
    pass


class _Link:
    """One server as this client sees it."""

    def __init__(self, index, endpoint, parts):
        self.index, self.endpoint, self.parts = index, endpoint, parts
        self.keys = [p.key for p in parts]
        self.socket = None
        self.incarnation = None
        self.clock = 0
        self.joined_at = 0.0
        self.hb_ok = time.monotonic()     # last heartbeat answered (set by the heartbeat thread)
        self.hb_incarnation = None
        self.hb_not_joined_at = None      # send time of a heartbeat answered "not_joined"


class _Request:
    """One in-flight request to one server; rebuilt from the link's state whenever it is (re)sent."""

    def __init__(self, link, op, grads=None, pull=False, epoch=0, keys=None, ahead=False):
        self.link, self.op, self.grads, self.pull, self.epoch, self.keys = link, op, grads, pull, epoch, keys
        self.ahead = ahead
        self.seq = None
        self.sent_at = 0.0
        self.sent_clock = self.sent_incarnation = None
        self.retries = 0
        self.reply = None

    def frames(self, client, seq):
        link = self.link
        self.seq, self.sent_at = seq, time.monotonic()
        self.sent_clock, self.sent_incarnation = link.clock, link.incarnation
        w = client.worker_id
        ahead = {"ahead": True} if self.ahead else {}      # sent only when set: plain headers stay as they were
        if self.op == "push":
            arrays = [self.grads[p.param][p.offset:p.offset + p.length] for p in link.parts]
            header = protocol.request("push", seq, worker=w, clock=link.clock, keys=link.keys, epoch=self.epoch,
                                      pull=self.pull, **ahead)
            return protocol.encode(header, arrays)
        if self.op == "pull":
            fields = {"keys": self.keys} if self.keys is not None else {}
            return protocol.encode(protocol.request("pull", seq, worker=w, clock=link.clock, **fields, **ahead))
        if self.op in ("leave", "heartbeat"):
            return protocol.encode(protocol.request(self.op, seq, worker=w))
        if self.op == "stats":
            return protocol.encode(protocol.request("stats", seq))
        raise ValueError(self.op)

    def after_rejoin(self):
        """The link was re-joined: drop a push the server had already counted (keep its read, if any)."""
        link = self.link
        if (self.op == "push" and link.incarnation == self.sent_incarnation
                and link.clock == self.sent_clock + 1):
            self.op = "pull" if self.pull else "done"


class Handle:
    """The requests of one push_async, to pass to wait()."""

    def __init__(self, requests):
        self.requests = requests


class PSClient:
    """Worker `worker_id`'s connection to the servers at `endpoints` (endpoint i serves layout server i).

    observer=True: a read-only client (no clock, never waited for, no heartbeats), e.g. for monitoring.
    security: an auth.ClientSecurity, or None for insecure (loopback) servers.
    """

    def __init__(self, endpoints, layout, worker_id, security=None, observer=False, heartbeat_interval=1.0,
                 server_timeout=10.0, reconnect_timeout=60.0, context=None, log=None):
        if len(endpoints) != layout.num_servers:
            raise ValueError(f"{len(endpoints)} endpoints for a layout of {layout.num_servers} servers")
        self.layout, self.worker_id, self.security, self.observer = layout, worker_id, security, observer
        self.heartbeat_interval = heartbeat_interval
        self.server_timeout, self.reconnect_timeout = server_timeout, reconnect_timeout
        self.links = [_Link(i, ep, layout.parts_of(i)) for i, ep in enumerate(endpoints)]
        self._own_context = context is None
        self.context = context or zmq.Context()
        self.log = log or (lambda text: None)
        self._seq = itertools.count(1)
        self.targets = None
        self.lr = None
        self.epoch = 0
        self.reconnects = 0
        self._hb_thread = None
        self._hb_stop = threading.Event()

    # ------------------------------------------------------------------------------------------ set-up
    def connect(self, targets=None, clock=0, epoch=0, timeout=None):
        """Join every server (waiting up to `timeout`, default reconnect_timeout, for them to come up).

        targets: one flat, writable, C-contiguous array per layout parameter; pulls are copied into them.
        """
        if targets is not None:
            self.set_targets(targets)
        self.epoch = epoch
        for link in self.links:
            link.clock = clock
            self._open(link)
        deadline = time.monotonic() + (timeout if timeout is not None else self.reconnect_timeout)
        for link in self.links:
            self._join(link, deadline)
        if not self.observer and self.heartbeat_interval:
            self._hb_thread = threading.Thread(target=self._heartbeats, name=f"ps-heartbeat-{self.worker_id}",
                                               daemon=True)
            self._hb_thread.start()
        return self

    def set_targets(self, targets):
        targets = list(targets)
        if len(targets) != len(self.layout.params):
            raise ValueError(f"{len(targets)} target arrays for {len(self.layout.params)} parameters")
        for t, spec in zip(targets, self.layout.params):
            if t.ndim != 1 or t.size != spec.size or t.dtype.str != spec.dtype or not t.flags.writeable \
                    or not t.flags.c_contiguous:
                raise ValueError(f"target for {spec.name}: need a writable contiguous 1-D {spec.dtype} array of "
                                 f"{spec.size} elements, got {t.dtype.str} shape {t.shape}")
        self.targets = targets

    def _open(self, link):
        sock = self.context.socket(zmq.DEALER)
        sock.linger = 0
        if self.security is not None:
            self.security.apply(sock)
        sock.connect(link.endpoint)
        link.socket = sock

    def _join(self, link, deadline):
        """Send join until the server answers (each try waits a second); raises ServerUnavailable at deadline."""
        while True:
            seq = next(self._seq)
            header = protocol.request("join", seq, worker=self.worker_id, clock=link.clock,
                                      fingerprint=self.layout.fingerprint, epoch=self.epoch)
            if self.observer:
                header["observer"] = True
            link.socket.send_multipart(protocol.encode(header), copy=False)
            try_until = min(deadline, time.monotonic() + 1.0)
            while True:
                left = try_until - time.monotonic()
                if left <= 0 or not link.socket.poll(int(left * 1000) + 1):
                    break
                reply, _ = self._decode(link, link.socket.recv_multipart(copy=False))
                if reply["seq"] != seq:
                    continue
                if reply["op"] == "error":
                    raise PSError(reply["code"], reply["message"], link.index)
                if reply["op"] != "joined" or reply["worker"] != self.worker_id or reply["server"] != link.index:
                    raise PSError("bad_reply", f"unexpected answer to join: {reply['op']}", link.index)
                link.incarnation, link.clock = reply["incarnation"], reply["clock"]
                link.joined_at = link.hb_ok = time.monotonic()
                link.hb_not_joined_at, link.hb_incarnation = None, None
                return
            if time.monotonic() >= deadline:
                raise ServerUnavailable("unreachable", f"no answer from {link.endpoint} to join", link.index)
            # no answer within a second: a fresh socket (the old one may hold a half-open connection)
            link.socket.close(linger=0)
            self._open(link)

    def _reconnect(self, link):
        self.reconnects += 1
        self.log(f"worker {self.worker_id}: reconnecting to server {link.index} at {link.endpoint}")
        link.socket.close(linger=0)
        self._open(link)
        self._join(link, time.monotonic() + self.reconnect_timeout)

    # ------------------------------------------------------------------------------------------ requests
    def pull(self, keys=None):
        """Copy the current parameters (all, or those of `keys`) into the targets; blocks as the mode requires."""
        links = self.links if keys is None else [l for l in self.links if set(l.keys) & set(keys)]
        reqs = [_Request(l, "pull", keys=None if keys is None else [k for k in l.keys if k in keys]) for l in links]
        self._finish(self._start(reqs))

    def push(self, grads, pull=True, epoch=None, ahead=False):
        """Send one gradient per parameter (flat arrays) to every server; with pull, install the update."""
        self.wait(self.push_async(grads, pull, epoch, ahead))

    def push_async(self, grads, pull=True, epoch=None, ahead=False):
        """Start a push (see push); wait(handle) finishes it. ahead=True: the worker computes its next step
        before it installs this read, so the read is for the step after next (ssp then bounds it one clock
        earlier, keeping the staleness bound what the job says)."""
        grads = self._check_grads(grads)
        if epoch is not None:
            self.epoch = epoch
        return Handle(self._start([_Request(l, "push", grads=grads, pull=pull, epoch=self.epoch, ahead=ahead)
                                   for l in self.links]))

    def wait(self, handle):
        self._finish(handle.requests)

    def stats(self, server=0):
        """The server's counters and clocks (a dict)."""
        req = _Request(self.links[server], "stats")
        self._finish(self._start([req]))
        return req.reply[0]["stats"]

    def leave(self):
        """Tell every server this worker is done (it stops counting for ssp and sync at once)."""
        self._stop_heartbeats()
        try:
            self._finish(self._start([_Request(l, "leave") for l in self.links]), rejoin=False)
        except PSError as exc:
            if exc.code != "not_joined":
                raise

    def become_observer(self):
        """After leave(): join again as a read-only observer (e.g. to read the final parameters)."""
        self._stop_heartbeats()
        self.observer = True
        deadline = time.monotonic() + self.reconnect_timeout
        for link in self.links:
            self._join(link, deadline)

    def close(self):
        self._stop_heartbeats()
        for link in self.links:
            if link.socket is not None:
                link.socket.close(linger=0)
                link.socket = None
        if self._own_context:
            self.context.term()

    def _check_grads(self, grads):
        grads = list(grads)
        if len(grads) != len(self.layout.params):
            raise ValueError(f"{len(grads)} gradients for {len(self.layout.params)} parameters")
        for g, spec in zip(grads, self.layout.params):
            if g.ndim != 1 or g.size != spec.size or g.dtype.str != spec.dtype or not g.flags.c_contiguous:
                raise ValueError(f"gradient for {spec.name}: need a contiguous 1-D {spec.dtype} array of "
                                 f"{spec.size} elements, got {g.dtype.str} shape {g.shape}")
        return grads

    def _start(self, reqs):
        for r in reqs:
            self._send(r)
        return reqs

    def _send(self, req):
        req.link.socket.send_multipart(req.frames(self, next(self._seq)), copy=False)

    def _finish(self, reqs, rejoin=True):
        """Wait for the reply to every request; retry after reconnects; install params replies."""
        pending = {r.link.index: r for r in reqs if r.op != "done"}
        while pending:
            poller = zmq.Poller()
            for r in pending.values():
                poller.register(r.link.socket, zmq.POLLIN)
            ready = dict(poller.poll(50))
            for index, r in list(pending.items()):
                link = r.link
                if link.socket in ready:
                    while True:
                        try:
                            frames = link.socket.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        header, arrays = self._decode(link, frames)
                        if header["seq"] != r.seq:
                            continue                      # the answer to a request given up on
                        if header["op"] == "error":
                            if rejoin and header["code"] in _REJOIN_CODES:
                                self._retry(r, f"server said {header['code']}: {header['message']}")
                                break
                            raise PSError(header["code"], header["message"], link.index)
                        self._accept(r, header, arrays)
                        del pending[index]
                        break
                    continue
                if rejoin and self._server_lost(r):
                    self._retry(r, "server restarted or silent")
            for index in [i for i, r in pending.items() if r.op == "done"]:
                del pending[index]

    def _server_lost(self, req):
        link, now = req.link, time.monotonic()
        if link.hb_incarnation is not None and link.hb_incarnation != link.incarnation:
            return True
        if link.hb_not_joined_at is not None and link.hb_not_joined_at > link.joined_at:
            return True
        if self._hb_thread is None:               # no heartbeats: a plain time-out
            return now - req.sent_at > self.server_timeout
        return now - link.hb_ok > self.server_timeout and now - req.sent_at > self.server_timeout

    def _retry(self, req, why):
        req.retries += 1
        if req.retries > _MAX_RETRIES:
            raise PSError("retries", f"gave up after {_MAX_RETRIES} retries ({why})", req.link.index)
        self.log(f"worker {self.worker_id}: server {req.link.index}: {why}; rejoining")
        self._reconnect(req.link)
        req.after_rejoin()
        if req.op != "done":
            self._send(req)

    def _decode(self, link, frames):
        try:
            return protocol.decode_reply(frames)
        except ProtocolError as exc:
            raise PSError("bad_reply", f"answer outside the protocol: {exc}", link.index) from None

    def _accept(self, req, header, arrays):
        link = req.link
        if header["incarnation"] != link.incarnation:
            # answered by a restarted server that somehow still knows us: take its clock
            link.incarnation = header["incarnation"]
        if "clock" in header:
            link.clock = header["clock"]
        if header.get("lr") is not None:
            self.lr = header["lr"]
        if header["op"] == "params":
            self._install(link, header, arrays)
        elif req.op == "pull" or (req.op == "push" and req.pull):
            raise PSError("bad_reply", f"expected parameters, got {header['op']}", link.index)
        req.reply = (header, arrays)

    def _install(self, link, header, arrays):
        owned = {p.key: p for p in link.parts}
        placed = []
        for key, array in zip(header["keys"], arrays):
            part = owned.get(key)
            if part is None:
                raise PSError("bad_reply", f"sent key {key}, which it does not hold", link.index)
            if array.dtype.str != self.layout.dtype_of(part) or array.shape != (part.length,):
                raise PSError("bad_reply", f"key {key} has dtype {array.dtype.str} shape {array.shape}, expected "
                                           f"{self.layout.dtype_of(part)} ({part.length},)", link.index)
            placed.append((part, array))
        if self.targets is None:
            return
        for part, array in placed:
            np.copyto(self.targets[part.param][part.offset:part.offset + part.length], array)

    # ------------------------------------------------------------------------------------------ heartbeats
    def _heartbeats(self):
        socks = {}
        for link in self.links:
            s = self.context.socket(zmq.DEALER)
            s.linger = 0
            s.sndhwm = 4
            if self.security is not None:
                self.security.apply(s)
            s.connect(link.endpoint)
            socks[link.index] = s
        sent = {}                                 # seq -> (link index, send time)
        try:
            while not self._hb_stop.is_set():
                for link in self.links:
                    seq = next(self._seq)
                    try:
                        socks[link.index].send_multipart(
                            protocol.encode(protocol.request("heartbeat", seq, worker=self.worker_id)), zmq.NOBLOCK)
                        sent[seq] = (link.index, time.monotonic())
                    except zmq.Again:
                        pass
                deadline = time.monotonic() + self.heartbeat_interval
                while not self._hb_stop.is_set():
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    poller = zmq.Poller()
                    for s in socks.values():
                        poller.register(s, zmq.POLLIN)
                    for s, _ in poller.poll(min(int(left * 1000) + 1, 200)):
                        self._heartbeat_reply(s, sent)
                if len(sent) > 1000:
                    sent = dict(list(sent.items())[-100:])
        finally:
            for s in socks.values():
                s.close(linger=0)

    def _heartbeat_reply(self, sock, sent):
        try:
            header, _ = protocol.decode_reply(sock.recv_multipart(copy=False))
        except (ProtocolError, zmq.ZMQError):
            return
        origin = sent.pop(header["seq"], None)
        if origin is None:
            return
        link = self.links[origin[0]]
        link.hb_incarnation = header["incarnation"]
        link.hb_ok = time.monotonic()
        if header["op"] == "error" and header["code"] == "not_joined":
            link.hb_not_joined_at = origin[1]

    def _stop_heartbeats(self):
        if self._hb_thread is not None:
            self._hb_stop.set()
            self._hb_thread.join(timeout=5)
            self._hb_thread = None
