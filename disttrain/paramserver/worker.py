"""PSClient: a worker's connection to all S servers — join, pull, push, heartbeats, reconnection.

    client = PSClient(endpoints, layout, worker_id=3, security=ClientSecurity.from_dir("keys", "worker-3"))
    client.connect(targets)                # join every server; targets: one flat writable array per parameter
    client.pull()                          # copy the current parameters into targets
    client.push(grads, pull=True)          # send gradients (a flat array, or None, per parameter); read the update
    handle = client.push_async(grads)      # ... compute the next step while the push travels ...
    client.wait(handle)                    # then install what came back
    client.leave(); client.close()

Each request goes to every server at once (each gets its own parts) and the client waits for all replies, so
the S servers work in parallel. Gradients are sent straight from their memory (copy=False): the caller must
not change them until the push's wait() returns. Replies are checked (keys, dtypes, shapes) before anything is
copied into `targets`.

NOTE (heartbeats): a server accepts a worker's heartbeats only on the connection it joined on, so they share
the request socket. Each link's lock guards its socket: the main thread holds it while it sends, polls or
reads (and then sends the heartbeats that are due itself); while it computes, a background thread takes the
free lock and sends them, so the worker stays live on the servers. Only the main thread reads: it sorts the
heartbeat replies out (by seq) as it waits for its own, and learns from them whether each server is alive and
which incarnation it is.

NOTE (faults): a request whose server restarted (new incarnation, or "not joined") or fell silent for
`server_timeout` is retried after a reconnect: a new socket, a new join, and the request again. The join's
answer says which clock the server has for us and the clock of our latest push its state holds: the push
that was waiting is sent again only when that state lacks it, so no push is applied twice (a lost reply) and
none is lost (a restart from an older snapshot). A server that stays away longer than `reconnect_timeout`
raises ServerUnavailable. Replies are read through protocol.receive with this link's bounds: at most one frame
per part it owns plus the header, and the bytes those hold.
"""
import contextlib
import itertools
import threading
import time

import numpy as np
import zmq

from disttrain.paramserver import protocol
from disttrain.paramserver.protocol import ProtocolError

__all__ = ["PSError", "ServerUnavailable", "PSClient", "PushHandle"]

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

    def __init__(self, index, endpoint, parts, layout):
        self.index, self.endpoint, self.parts = index, endpoint, parts
        self.keys = [p.key for p in parts]
        part_bytes = [p.length * np.dtype(layout.dtype_of(p)).itemsize for p in parts]
        self.largest_frame = max(part_bytes + [protocol.MAX_HEADER_BYTES]) + protocol.FRAME_SLACK
        self.max_frames = 1 + len(parts)
        self.max_bytes = sum(part_bytes) + protocol.MAX_HEADER_BYTES + protocol.FRAME_SLACK
        self.lock = threading.RLock()     # guards `socket`: the main thread and the heartbeat thread use it
        self.socket = None
        self.joined = False
        self.incarnation = None
        self.clock = 0
        self.updates = 0                  # the server's update count when it last joined us or sent parameters
        self.last_push = None             # clock of our latest push the server's state holds (from the join, then
                                          # from each push answered with parameters)
        self.joined_at = 0.0
        self.hb_sent = {}                 # seq -> send time of heartbeats not answered yet
        self.hb_last = 0.0                # when the last heartbeat was sent
        self.hb_ok = time.monotonic()     # when the server was last heard from
        self.hb_incarnation = None
        self.hb_not_joined_at = None      # send time of a heartbeat answered "not_joined"


class _Request:
    """One in-flight request to one server; rebuilt from the link's state whenever it is (re)sent."""

    def __init__(self, link, op, grads=None, pull=False, epoch=0, keys=None, ahead=False):
        self.link, self.op, self.grads, self.pull, self.epoch, self.keys = link, op, grads, pull, epoch, keys
        self.ahead = ahead
        self.seq = None
        self.sent_at = 0.0
        self.sent_clock = None
        self.retries = 0
        self.reply = None

    def frames(self, client, seq):
        link = self.link
        self.seq, self.sent_at = seq, time.monotonic()
        self.sent_clock = link.clock
        w = client.worker_id
        ahead = {"ahead": True} if self.ahead else {}      # sent only when set: plain headers stay as they were
        if self.op == "push":
            sent = [p for p in link.parts if self.grads[p.param] is not None]
            no_grad = [p.key for p in link.parts if self.grads[p.param] is None]
            arrays = [self.grads[p.param][p.offset:p.offset + p.length] for p in sent]
            header = protocol.request("push", seq, worker=w, clock=link.clock, keys=[p.key for p in sent],
                                      epoch=self.epoch, pull=self.pull, **ahead,
                                      **({"no_grad": no_grad} if no_grad else {}))
            return protocol.encode(header, arrays)
        if self.op == "pull":
            fields = {"keys": self.keys} if self.keys is not None else {}
            return protocol.encode(protocol.request("pull", seq, worker=w, clock=link.clock, **fields, **ahead))
        if self.op == "leave":
            return protocol.encode(protocol.request("leave", seq, worker=w))
        if self.op == "stats":
            return protocol.encode(protocol.request("stats", seq))
        raise ValueError(self.op)

    def after_rejoin(self):
        """The link was re-joined: drop a push the server's state already holds (keep its read, if any)."""
        link = self.link
        if self.op == "push" and link.last_push is not None and link.last_push >= self.sent_clock:
            self.op = "pull" if self.pull else "done"


class PushHandle:
    """The requests of one push_async, to pass to wait()."""

    def __init__(self, requests):
        self.requests = requests


class PSClient:
    """Worker `worker_id`'s connection to the servers at `endpoints` (endpoint i serves layout server i).

    observer=True: a read-only client (no clock, never waited for, no heartbeats), e.g. for monitoring.
    security: an auth.ClientSecurity, or None for insecure (loopback) servers. timeout_setting: the setting that
    gave reconnect_timeout (e.g. "[ps] reconnect_timeout"), named where a wait for a server is said or ends.
    """

    def __init__(self, endpoints, layout, worker_id, security=None, observer=False, heartbeat_interval=1.0,
                 server_timeout=10.0, reconnect_timeout=60.0, context=None, log=None, timeout_setting=None):
        if len(endpoints) != layout.num_servers:
            raise ValueError(f"{len(endpoints)} endpoints for a layout of {layout.num_servers} servers")
        self.layout, self.worker_id, self.security, self.observer = layout, worker_id, security, observer
        self.heartbeat_interval = heartbeat_interval
        self.server_timeout, self.reconnect_timeout = server_timeout, reconnect_timeout
        self.timeout_setting = timeout_setting
        self.links = [_Link(i, ep, layout.parts_of(i), layout) for i, ep in enumerate(endpoints)]
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
        """Join every server (waiting up to `timeout`, default reconnect_timeout, for them to come up; the wait is
        logged first, so that it is not a silent one).

        targets: one flat, writable, C-contiguous array per layout parameter; pulls are copied into them.
        """
        if targets is not None:
            self.set_targets(targets)
        self.epoch = epoch
        for link in self.links:
            link.clock = clock
            self._open(link)
        bound = self._wait_bound(timeout)
        self.log(f"worker {self.worker_id}: joining {len(self.links)} server(s) at "
                 f"{', '.join(link.endpoint for link in self.links)}; waiting up to {bound}")
        deadline = time.monotonic() + (timeout if timeout is not None else self.reconnect_timeout)
        for link in self.links:
            self._join(link, deadline, bound)
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
        with link.lock:
            sock = self.context.socket(zmq.DEALER)
            sock.linger = 0
            sock.setsockopt(zmq.MAXMSGSIZE, link.largest_frame)
            if self.security is not None:
                self.security.apply(sock)
            sock.connect(link.endpoint)
            link.socket = sock
            link.hb_sent = {}

    def _wait_bound(self, timeout=None):
        """How long a wait for a server may last, for messages: "5 s", or "120 s ([ps] reconnect_timeout)" for
        reconnect_timeout (timeout None)."""
        if timeout is not None:
            return f"{timeout:g} s"
        return f"{self.reconnect_timeout:g} s" + (f" ({self.timeout_setting})" if self.timeout_setting else "")

    def _join(self, link, deadline, bound):
        """Send join until the server answers (each try waits a second); raises ServerUnavailable at deadline
        (its message says the wait's `bound`, a _wait_bound)."""
        with link.lock:
            link.joined = False
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
                    reply, _ = self._receive(link)
                    if reply is None or reply["seq"] != seq:
                        continue
                    self._joined(link, reply)
                    return
                if time.monotonic() >= deadline:
                    raise ServerUnavailable("unreachable", f"no answer from {link.endpoint} to join within {bound}",
                                            link.index)
                # no answer within a second: a fresh socket (the old one may hold a half-open connection)
                link.socket.close(linger=0)
                self._open(link)

    def _joined(self, link, reply):
        if reply["op"] == "error":
            raise PSError(reply["code"], reply["message"], link.index)
        if reply["op"] != "joined" or reply["worker"] != self.worker_id or reply["server"] != link.index:
            raise PSError("bad_reply", f"unexpected answer to join: {reply['op']}", link.index)
        link.incarnation = reply["incarnation"]
        if not self.observer:             # an observer has no clock (0): a worker turned observer keeps its own
            link.clock, link.last_push = reply["clock"], reply.get("last_push")
        link.updates = reply.get("updates", link.updates)
        link.joined_at = link.hb_ok = time.monotonic()
        link.hb_not_joined_at, link.hb_incarnation = None, None
        link.joined = True

    def _reconnect(self, link):
        self.reconnects += 1
        self.log(f"worker {self.worker_id}: reconnecting to server {link.index} at {link.endpoint}")
        with link.lock:
            link.joined = False
            link.socket.close(linger=0)
            self._open(link)
            self._join(link, time.monotonic() + self.reconnect_timeout, self._wait_bound())

    # ------------------------------------------------------------------------------------------ requests
    def pull(self, keys=None):
        """Copy the current parameters (all, or those of `keys`) into the targets; blocks as the mode requires."""
        links = self.links if keys is None else [l for l in self.links if set(l.keys) & set(keys)]
        reqs = [_Request(l, "pull", keys=None if keys is None else [k for k in l.keys if k in keys]) for l in links]
        self._finish(self._start(reqs))

    def push(self, grads, pull=True, epoch=None, ahead=False):
        """Send one gradient per parameter (flat arrays, or None for a parameter without one: the servers leave
        it alone) to every server; with pull, install the update."""
        self.wait(self.push_async(grads, pull, epoch, ahead))

    def push_async(self, grads, pull=True, epoch=None, ahead=False):
        """Start a push (see push); wait(handle) finishes it. ahead=True: the worker computes its next step
        before it installs this read, so the read is for the step after next (ssp then bounds it one clock
        earlier, keeping the staleness bound what the job says)."""
        grads = self._check_grads(grads)
        if epoch is not None:
            self.epoch = epoch
        return PushHandle(self._start([_Request(l, "push", grads=grads, pull=pull, epoch=self.epoch, ahead=ahead)
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
        """After leave(): join again as a read-only observer (e.g. to read the final parameters); each link keeps
        this worker's clock and latest push there, what a checkpoint taken now records of it."""
        self._stop_heartbeats()
        self.observer = True
        deadline = time.monotonic() + self.reconnect_timeout
        for link in self.links:
            self._join(link, deadline, self._wait_bound())

    def close(self):
        self._stop_heartbeats()
        for link in self.links:
            with link.lock:
                if link.socket is not None:
                    link.socket.close(linger=0)
                    link.socket = None
                link.joined = False
        if self._own_context:
            self.context.term()

    def _check_grads(self, grads):
        grads = list(grads)
        if len(grads) != len(self.layout.params):
            raise ValueError(f"{len(grads)} gradients for {len(self.layout.params)} parameters")
        for g, spec in zip(grads, self.layout.params):
            if g is None:
                continue
            if g.ndim != 1 or g.size != spec.size or g.dtype.str != spec.dtype or not g.flags.c_contiguous:
                raise ValueError(f"gradient for {spec.name}: need a contiguous 1-D {spec.dtype} array of "
                                 f"{spec.size} elements, got {g.dtype.str} shape {g.shape}")
        return grads

    def _start(self, reqs):
        for r in reqs:
            self._send(r)
        return reqs

    def _send(self, req):
        with req.link.lock:
            req.link.socket.send_multipart(req.frames(self, next(self._seq)), copy=False)

    def _finish(self, reqs, rejoin=True):
        """Wait for the reply to every request; retry after reconnects; install params replies."""
        pending = {r.link.index: r for r in reqs if r.op != "done"}
        while pending:
            with contextlib.ExitStack() as held:
                for index in sorted(pending):                 # one order everywhere: no deadlock
                    held.enter_context(pending[index].link.lock)
                lost = self._wait_step(pending, rejoin)
            for r, why in lost:                               # reconnect with the other links free for heartbeats
                self._retry(r, why)
            for index in [i for i, r in pending.items() if r.op == "done"]:
                del pending[index]

    def _wait_step(self, pending, rejoin):
        """One poll of the pending requests' sockets (their locks held): read what came, send heartbeats due.
        Answered requests leave `pending`; returns [(request, why)] of those to retry after a reconnect."""
        poller = zmq.Poller()
        for r in pending.values():
            poller.register(r.link.socket, zmq.POLLIN)
        ready = dict(poller.poll(50))
        lost = []
        for index, r in list(pending.items()):
            link = r.link
            if link.socket not in ready:
                if self._server_lost(r):
                    if rejoin:
                        lost.append((r, "server restarted or silent"))
                    else:                         # nothing to rejoin for (a leave): a server gone needs no answer
                        self.log(f"worker {self.worker_id}: server {index}: no answer to {r.op} within "
                                 f"{self.server_timeout:g} s; going on without it")
                        del pending[index]
                continue
            while True:
                try:
                    header, arrays = self._receive(link, zmq.NOBLOCK)
                except zmq.Again:
                    break
                if header is None or header["seq"] != r.seq:
                    continue                      # a heartbeat's answer, or one to a request given up on
                if header["op"] == "error":
                    if rejoin and header["code"] in _REJOIN_CODES:
                        lost.append((r, f"server said {header['code']}: {header['message']}"))
                        break
                    raise PSError(header["code"], header["message"], link.index)
                self._accept(r, header, arrays)
                del pending[index]
                break
        for r in pending.values():
            self._heartbeat_if_due(r.link)
        return lost

    def _server_lost(self, req):
        link, now = req.link, time.monotonic()
        if link.hb_incarnation is not None and link.hb_incarnation != link.incarnation:
            return True
        if link.hb_not_joined_at is not None and link.hb_not_joined_at > link.joined_at:
            return True
        if self.observer or not self.heartbeat_interval:      # no heartbeats: a plain time-out
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

    def _receive(self, link, flags=0):
        """The next message from the server (link.lock held): (header, arrays), or (None, None) for the answer
        to a heartbeat, which is handled here. Raises zmq.Again (flags=NOBLOCK) when none waits."""
        frames, problem = protocol.receive(link.socket, link.max_frames, link.max_bytes, flags)
        try:
            if problem is not None:
                raise problem
            header, arrays = protocol.decode_reply(frames)
        except ProtocolError as exc:
            raise PSError("bad_reply", f"answer outside the protocol: {exc}", link.index) from None
        link.hb_ok = time.monotonic()
        sent_at = link.hb_sent.pop(header["seq"], None)
        if sent_at is None:
            return header, arrays
        link.hb_incarnation = header["incarnation"]
        if header["op"] == "error" and header["code"] == "not_joined":
            link.hb_not_joined_at = sent_at
        return None, None

    def _accept(self, req, header, arrays):
        link = req.link
        if header["incarnation"] != link.incarnation:
            # answered by a restarted server that somehow still knows us: take its clock
            link.incarnation = header["incarnation"]
        if "clock" in header and not self.observer:
            link.clock = header["clock"]
        if header.get("lr") is not None:
            self.lr = header["lr"]
        if header["op"] == "params":
            self._install(link, header, arrays)
            link.updates = header.get("updates", link.updates)
            if req.op == "push":          # answered with parameters: the server's state holds this push
                link.last_push = max(req.sent_clock, -1 if link.last_push is None else link.last_push)
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
        """The background thread: heartbeats on the links the main thread is not using."""
        while not self._hb_stop.wait(self.heartbeat_interval / 4):
            for link in self.links:
                if link.lock.acquire(blocking=False):
                    try:
                        self._heartbeat_if_due(link)
                    finally:
                        link.lock.release()

    def _heartbeat_if_due(self, link):
        """Send a heartbeat on a joined link whose last one is `heartbeat_interval` old (link.lock held)."""
        now = time.monotonic()
        if (self.observer or not self.heartbeat_interval or not link.joined or link.socket is None
                or now - link.hb_last < self.heartbeat_interval):
            return
        seq = next(self._seq)
        try:
            link.socket.send_multipart(protocol.encode(protocol.request("heartbeat", seq, worker=self.worker_id)),
                                       zmq.NOBLOCK)
        except zmq.Again:                         # the server is not taking messages: nothing to add to the queue
            return
        link.hb_last, link.hb_sent[seq] = now, now
        if len(link.hb_sent) > 100:               # answers lost with an old connection
            for old in sorted(link.hb_sent)[:-10]:
                del link.hb_sent[old]

    def _stop_heartbeats(self):
        if self._hb_thread is not None:
            self._hb_stop.set()
            self._hb_thread.join(timeout=5)
            self._hb_thread = None
        self._hb_stop.clear()
