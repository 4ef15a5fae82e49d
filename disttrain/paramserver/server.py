"""ParameterServer: owns its parts of the parameters and their optimizer; serves pull, push and control messages.

One thread, one ROUTER socket, one poll loop. For every message, in this order:
    1. decode_request: the header and frames on their own (protocol.py);
    2. the checks that need this server's state: worker joined on this connection, keys owned, dtypes and
       shapes equal to the server's, the clock the worker must be at, gradients finite (unless allowed);
    3. only then the state changes: the clock advances, the gradient is applied (async, ssp) or added to the
       round (sync), and the reply is sent — or, for a read the consistency model holds back, queued.
Anything failing in 1 or 2 is answered with an error reply naming the problem and changes nothing.

The update applies the server-side optimizer (disttrain.optim: SGD with momentum, Adam, AdamW) to the parts
that came in, then the per-update LR schedule; the per-epoch schedule follows the slowest live worker's epoch.
Each part is its own 1-D Parameter, so the optimizer's elementwise arithmetic is exactly that of local
training on the whole tensor.

NOTE (zero-copy replies): a params reply hands the parts' memory to ZMQ without copying (copy=False) and keeps
the frames' trackers. Before the optimizer next changes a part in place, the server checks them; if ZMQ may
still be reading that memory, the part gets a fresh copy first (copy-on-write), so a reply never carries a
half-updated part.

NOTE (snapshots): every `snapshot_every` updates, on request_stop() (SIGTERM in the CLI) and on close(), the
server writes parameters, optimizer state, LR schedules, versions and counters atomically (snapshot.py). A new
server started with the same snapshot path resumes from it; see docs/PARAMSERVER.md for what a crash loses.
"""
import math
import secrets
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zmq

from disttrain.autograd.grad_mode import no_grad
from disttrain.nn.parameter import Parameter
from disttrain.paramserver import protocol
from disttrain.paramserver.consistency import Consistency, SyncRound
from disttrain.paramserver.membership import Membership
from disttrain.paramserver.protocol import ProtocolError
from disttrain.paramserver.snapshot import SnapshotError, load_snapshot, save_snapshot
from disttrain.tensor.tensor import Tensor
from disttrain.train.checkpoint import join_optimizer_state, split_optimizer_state

__all__ = ["ServerConfig", "ParameterServer"]

ZERO_COPY_BYTES = 1 << 16         # smaller arrays are copied into their frames (cheaper than tracking them)
SNAPSHOT_FORMAT = "disttrain-ps-shard"
MAX_READ_RECORDS = 10_000


@dataclass
class ServerConfig:
    consistency: str = "async"        # "async", "ssp" or "sync"
    staleness: int = 0                # ssp's bound s
    heartbeat_timeout: float = 10.0   # seconds of silence before a worker is dropped
    snapshot_every: int = 0           # updates between snapshots (0: only on stop and close)
    snapshot_path: object = None      # a file path, or None for no snapshots
    reject_nonfinite: bool = True     # refuse gradients holding NaN or inf
    log_every: float = 10.0           # seconds between update-rate log lines (0: never)
    expect_workers: int = 1           # ssp/sync: hold the first reads until this many workers joined ...
    start_timeout: float = 60.0       # ... or this many seconds passed since the first join


class ParameterServer:
    """Server `index` of layout.num_servers.

    initial: one array per layout parameter (the full tensors; the server keeps copies of its parts).
    make_optimizer(params) -> (optimizer, schedules): schedules has `.epoch` and `.step` (each a scheduler or
    None), `state_dict()` and `load_state_dict()` (disttrain.train.build.Schedules). It is not called when
    the server owns no part.
    security: an auth.ServerSecurity, or None for an insecure (loopback only) server.
    """

    def __init__(self, index, layout, initial, make_optimizer, config=None, bind="tcp://127.0.0.1:0",
                 security=None, log=None):
        if not 0 <= index < layout.num_servers:
            raise ValueError(f"server index {index} out of range [0, {layout.num_servers})")
        self.index, self.layout = index, layout
        self.config = config or ServerConfig()
        self.consistency = Consistency(self.config.consistency, self.config.staleness)
        self.membership = Membership(self.config.heartbeat_timeout)
        self.bind, self.security = bind, security
        self.log = log or (lambda text: print(text, file=sys.stderr, flush=True))
        self.incarnation = secrets.randbits(63)

        self.parts = {p.key: p for p in layout.parts_of(index)}
        self.keys = sorted(self.parts)
        self.shards = {}
        for key in self.keys:
            part = self.parts[key]
            flat = np.asarray(initial[part.param]).reshape(-1)
            if flat.dtype.str != layout.dtype_of(part):
                raise ValueError(f"initial value of {layout.params[part.param].name} is {flat.dtype}, "
                                 f"the layout says {layout.dtype_of(part)}")
            self.shards[key] = Parameter(np.array(flat[part.offset:part.offset + part.length], copy=True))
        self.optimizer, self.schedules = (make_optimizer([self.shards[k] for k in self.keys])
                                          if self.keys else (None, None))
        self.versions = {k: 0 for k in self.keys}
        self.updates = 0                      # optimizer updates applied
        self.round = 0                        # sync: completed rounds
        self.epoch = 0                        # epochs the per-epoch LR schedule has been stepped
        self._round = SyncRound(0)
        self._waiting = []                    # reads held back by ssp / sync
        self._inflight = {k: [] for k in self.keys}   # trackers of zero-copy frames still owned by ZMQ
        self.requests = self.rejected = self.deferred = self.copies_on_write = 0
        self.reads = []                       # ssp: (worker, clock, slowest live clock) of answered reads
        self.max_lead = 0                     # ssp: the largest clock - slowest clock ever answered
        self.snapshots = 0
        self._snapshot_at = 0
        self._stop = False
        self._first_join = None
        self.started = self.consistency.mode == "async"          # ssp/sync: see _check_start
        self.context = self.socket = self.endpoint = None
        path = self.config.snapshot_path
        if path is not None and Path(path).exists():
            self._restore(Path(path))

    # ------------------------------------------------------------------------------------------ life cycle
    def start(self):
        """Bind the socket (and start the ZAP handler); sets and returns `endpoint`."""
        self.context = zmq.Context()
        if self.security is not None:
            self.security.start(self.context)
        sock = self.context.socket(zmq.ROUTER)
        sock.linger = 500
        largest = max((p.length * np.dtype(self.layout.dtype_of(p)).itemsize for p in self.parts.values()),
                      default=0)
        sock.setsockopt(zmq.MAXMSGSIZE, max(largest, protocol.MAX_HEADER_BYTES) + 1024)
        if self.security is not None:
            self.security.apply(sock)
        sock.bind(self.bind)
        self.socket = sock
        self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        return self.endpoint

    def request_stop(self):
        """Stop serving after the current message, snapshot and close (safe from a signal handler)."""
        self._stop = True

    def serve(self, stop_event=None, duration=None):
        """Serve until request_stop(), stop_event.is_set() or `duration` seconds; then snapshot and close."""
        if self.socket is None:
            self.start()
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        start = last_check = last_log = time.monotonic()
        logged_updates = self.updates
        try:
            while not self._stop and not (stop_event is not None and stop_event.is_set()):
                if poller.poll(50):
                    for _ in range(1000):
                        try:
                            frames = self.socket.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self._handle(frames)
                now = time.monotonic()
                if now - last_check >= 0.1:
                    last_check = now
                    self._expire(now)
                    if not self.started and self._check_start(now):
                        self._release()
                if self.config.log_every and now - last_log >= self.config.log_every:
                    self._log_rate(now - last_log, self.updates - logged_updates)
                    last_log, logged_updates = now, self.updates
                if duration is not None and now - start >= duration:
                    break
        finally:
            self.close()

    def close(self):
        """Final snapshot (when configured), then close the socket, the ZAP handler and the context."""
        if self.socket is None:
            return
        if self.config.snapshot_path is not None:
            self.snapshot()
        self.socket.close()
        self.socket = None
        if self.security is not None:
            self.security.stop()
        self.context.term()
        self.context = None

    def _log_rate(self, seconds, updates):
        clocks = self.membership.clocks()
        slowest = min(clocks.values()) if clocks else "-"
        self.log(f"server {self.index}: {updates / seconds:.1f} updates/s ({self.updates} total), "
                 f"{len(clocks)} workers live, slowest clock {slowest}, {self.rejected} rejected")

    # ------------------------------------------------------------------------------------------ dispatch
    def _handle(self, frames):
        self.requests += 1
        identity, body = frames[0].bytes, frames[1:]
        try:
            header, arrays = protocol.decode_request(body)
            handler = getattr(self, "_on_" + header["op"])
            handler(identity, header, arrays)
        except ProtocolError as exc:
            self.rejected += 1
            self._send(identity, protocol.error_reply(protocol.peek_seq(body) if body else None, self.incarnation,
                                                      exc.code, str(exc)))

    def _send(self, identity, frames):
        try:
            self.socket.send_multipart([identity, *frames], copy=False)
        except zmq.ZMQError as exc:       # the peer went away: nothing to answer
            self.log(f"server {self.index}: reply not sent ({exc})")

    def _reply(self, identity, op, seq, **fields):
        self._send(identity, protocol.encode(protocol.reply(op, seq, self.incarnation, **fields)))

    # ------------------------------------------------------------------------------------------ control
    def _on_join(self, identity, header, _):
        if header["fingerprint"] != self.layout.fingerprint:
            raise ProtocolError("layout_mismatch", "the worker's parameter layout differs from this server's "
                                                   "(another model, dtype or number of servers)")
        worker, now = header["worker"], time.monotonic()
        if header.get("observer", False):
            if worker in self.membership.workers:
                raise ProtocolError("bad_field", f"worker {worker} is joined as a worker; observers need another id")
            self.membership.join_observer(worker, identity)
            clock = 0
        else:
            state = self.membership.get(worker)
            if state is None:
                clock = self._clock_for_newcomer(header["clock"])
                if worker in self.membership.observers:
                    del self.membership.observers[worker]
            else:
                clock = state.clock
            self.membership.join(worker, identity, clock, header.get("epoch", 0), now)
            self.log(f"server {self.index}: worker {worker} joined at clock {clock}")
            if self._first_join is None:
                self._first_join = now
            if not self.started and self._check_start(now):
                self._release()
        self._reply(identity, "joined", header["seq"], worker=worker, clock=clock, server=self.index,
                    mode=self.consistency.mode, staleness=self.consistency.staleness)

    def _check_start(self, now):
        """ssp/sync start together: the first reads wait for `expect_workers` joins (or `start_timeout`), so a
        sync job's first steps average every worker's gradient, as local training on the combined batch would."""
        if self.updates or len(self.membership.workers) >= self.config.expect_workers or (
                self._first_join is not None and now - self._first_join >= self.config.start_timeout):
            self.started = True
        return self.started

    def _clock_for_newcomer(self, requested):
        """A new worker starts where the others are, so that it holds nobody back (and is not held back)."""
        if self.consistency.aggregates:
            if not self.membership.workers:          # the first worker (or the first after a restart) sets it
                self.round = requested
                self._round = SyncRound(self.round)
            return self.round
        slowest = self.membership.min_clock()
        return requested if slowest is None else max(requested, slowest)

    def _on_leave(self, identity, header, _):
        worker = header["worker"]
        self._check_connection(identity, worker, allow_observer=True)
        self.membership.leave(worker)
        self.log(f"server {self.index}: worker {worker} left")
        self._membership_changed()
        self._reply(identity, "ok", header["seq"])

    def _on_heartbeat(self, identity, header, _):
        worker = header["worker"]
        if worker not in self.membership.workers and worker not in self.membership.observers:
            raise ProtocolError("not_joined", f"worker {worker} has not joined this server (or was dropped)")
        self.membership.touch(worker, time.monotonic())
        slowest = self.membership.min_clock()
        self._reply(identity, "ok", header["seq"], **({"min_clock": slowest} if slowest is not None else {}))

    def _on_stats(self, identity, header, _):
        stats = {"server": self.index, "updates": self.updates, "requests": self.requests, "rejected": self.rejected,
                 "deferred": self.deferred, "round": self.round, "epoch": self.epoch, "keys": len(self.keys),
                 "clocks": {str(w): c for w, c in self.membership.clocks().items()},
                 "dropped": list(self.membership.dropped[-1000:]), "waiting": len(self._waiting),
                 "reads": self.reads[-MAX_READ_RECORDS:], "max_lead": self.max_lead, "snapshots": self.snapshots,
                 "copies_on_write": self.copies_on_write,
                 "auth_denied": self.security.denied if self.security is not None else 0,
                 "lr": self._lr(), "mode": self.consistency.mode, "staleness": self.consistency.staleness}
        self._reply(identity, "stats", header["seq"], stats=stats)

    def _check_connection(self, identity, worker, allow_observer=False):
        state = self.membership.get(worker)
        if state is None:
            if allow_observer and self.membership.observers.get(worker) is not None:
                if self.membership.observers[worker] != identity:
                    raise ProtocolError("wrong_connection", f"observer {worker} joined on another connection")
                return None
            raise ProtocolError("not_joined", f"worker {worker} has not joined this server (or was dropped); "
                                              f"join again")
        if state.identity != identity:
            raise ProtocolError("wrong_connection", f"worker {worker} joined on another connection; join again")
        return state

    # ------------------------------------------------------------------------------------------ pull and push
    def _owned(self, keys):
        for key in keys:
            if key not in self.parts:
                raise ProtocolError("bad_key", f"key {key} is not held by server {self.index}")

    def _check_ahead(self, header):
        """A read ahead needs room for one more clock: async, or ssp with staleness >= 1 (else it waits on
        the worker's own next push, which the worker sends only after this read: a deadlock)."""
        if header.get("ahead", False) and not self.consistency.allows_ahead:
            raise ProtocolError("bad_mode", f"server {self.index} runs {self.consistency!r}: reads ahead (push "
                                            f"overlapped with compute) need async or ssp with staleness >= 1")

    def _on_pull(self, identity, header, _):
        worker = header["worker"]
        self._check_ahead(header)
        state = self._check_connection(identity, worker, allow_observer=True)
        keys = header.get("keys") or self.keys
        self._owned(keys)
        versions = header.get("versions")
        if state is None:                         # an observer reads whatever is there now
            self._answer_read(identity, worker, header["seq"], keys, versions, clock=0, read_clock=0, record=False)
            return
        self.membership.touch(worker, time.monotonic())
        if header["clock"] != state.clock:
            raise ProtocolError("bad_clock", f"worker {worker} is at clock {state.clock} on this server, "
                                             f"the pull says {header['clock']}")
        self._read(identity, worker, header["seq"], keys, versions, state.clock, header.get("ahead", False))

    def _on_push(self, identity, header, arrays):
        worker, keys, clock = header["worker"], header["keys"], header["clock"]
        self._check_ahead(header)
        state = self._check_connection(identity, worker)
        self._owned(keys)
        if self.consistency.aggregates and sorted(keys) != self.keys:
            raise ProtocolError("bad_key", f"sync mode: a push must hold every key of server {self.index} "
                                           f"({len(self.keys)} keys), got {len(keys)}")
        for key, array in zip(keys, arrays):
            part = self.parts[key]
            if array.dtype.str != self.layout.dtype_of(part):
                raise ProtocolError("bad_dtype", f"key {key}: gradient of dtype {array.dtype.str}, the parameter "
                                                 f"is {self.layout.dtype_of(part)}")
            if array.shape != (part.length,):
                raise ProtocolError("bad_shape", f"key {key}: gradient of shape {list(array.shape)}, the part "
                                                 f"has shape [{part.length}]")
        duplicate = clock + 1 == state.clock
        if clock != state.clock and not duplicate:
            raise ProtocolError("bad_clock", f"worker {worker} is at clock {state.clock} on this server, "
                                             f"the push says {clock}")
        if not duplicate and self.config.reject_nonfinite:
            for key, array in zip(keys, arrays):
                if not _all_finite(array):
                    raise ProtocolError("nonfinite", f"key {key}: the gradient holds NaN or inf; this job "
                                                     f"refuses non-finite gradients")
        # ---- every check passed: change state ----
        self.membership.touch(worker, time.monotonic())
        if not duplicate:
            state.clock += 1
            state.epoch = max(state.epoch, header.get("epoch", 0))
            grads = dict(zip(keys, arrays))
            if self.consistency.aggregates:
                self._round.add(worker, grads)
                self._finish_round_if_complete()
            else:
                self._apply(grads)
        if header.get("pull", False):
            self._read(identity, worker, header["seq"], self.keys, None, state.clock, header.get("ahead", False))
        else:
            self._reply(identity, "ok", header["seq"], clock=state.clock, lr=self._lr())
        if not duplicate:
            self._release()

    # ------------------------------------------------------------------------------------------ reads
    def _read(self, identity, worker, seq, keys, versions, clock, ahead=False):
        """A read by `worker` at `clock`; ahead: its values are for the step after next, so the consistency
        model judges it as a read at clock + 1."""
        read_clock = clock + 1 if ahead else clock
        if self.started and self.consistency.may_read(read_clock, self.membership.min_clock(), self.round):
            self._answer_read(identity, worker, seq, keys, versions, clock, read_clock)
        else:
            self.deferred += 1
            self._waiting.append((identity, worker, seq, keys, versions, clock, read_clock))

    def _release(self):
        """Answer every held-back read the consistency model now allows; forget those of departed workers."""
        if not self._waiting or not self.started:
            return
        still = []
        slowest = self.membership.min_clock()
        for item in self._waiting:
            identity, worker, seq, keys, versions, clock, read_clock = item
            state = self.membership.get(worker)
            if state is None or state.identity != identity:
                continue
            if self.consistency.may_read(read_clock, slowest, self.round):
                self._answer_read(identity, worker, seq, keys, versions, clock, read_clock)
            else:
                still.append(item)
        self._waiting = still

    def _answer_read(self, identity, worker, seq, keys, versions, clock, read_clock, record=True):
        """Send the parameters; clock: the worker's clock (echoed), read_clock: the clock the read counts as."""
        if versions is not None:
            keys = [k for k, v in zip(keys, versions) if self.versions[k] != v]
        if record and self.consistency.mode == "ssp":
            slowest = self.membership.min_clock()
            lead = read_clock - (slowest if slowest is not None else read_clock)
            self.max_lead = max(self.max_lead, lead)
            if len(self.reads) < 10 * MAX_READ_RECORDS:
                self.reads.append([worker, read_clock, read_clock - lead])
        arrays = [self.shards[k].data for k in keys]
        fields = {"keys": list(keys), "versions": [self.versions[k] for k in keys], "clock": clock,
                  "updates": self.updates}
        lr = self._lr()
        if lr is not None:
            fields["lr"] = lr
        frames = protocol.encode(protocol.reply("params", seq, self.incarnation, **fields), arrays)
        for i, (key, array) in enumerate(zip(keys, arrays), start=1):
            if array.nbytes >= ZERO_COPY_BYTES:
                frame = zmq.Frame(frames[i], copy=False, track=True)
                self._inflight[key].append(frame.tracker)
                frames[i] = frame
        self._send(identity, frames)

    # ------------------------------------------------------------------------------------------ updates
    def _apply(self, grads):
        """One optimizer update of the parts in `grads` ({key: array of the part's shape and dtype})."""
        target = self.membership.min_epoch()
        while target is not None and self.epoch < target:
            if self.schedules is not None and self.schedules.epoch is not None:
                self.schedules.epoch.step()
            self.epoch += 1
        touched = []
        for key, g in grads.items():
            shard = self.shards[key]
            if any(not t.done for t in self._inflight[key]):
                shard.data = shard.data.copy()     # copy-on-write: ZMQ may still be sending the old memory
                self.copies_on_write += 1
            self._inflight[key] = []
            shard.grad = Tensor(g)
            touched.append(shard)
        with no_grad():
            self.optimizer.step()
        for key, shard in zip(grads, touched):
            shard.grad = None
            self.versions[key] += 1
        self.updates += 1
        if self.schedules is not None and self.schedules.step is not None:
            self.schedules.step.step()
        every = self.config.snapshot_every
        if every and self.config.snapshot_path is not None and self.updates - self._snapshot_at >= every:
            self.snapshot()

    def _finish_round_if_complete(self):
        if self.consistency.aggregates and self._round.complete(self.membership.live()):
            self._apply(self._round.mean())
            self.round += 1
            self._round = SyncRound(self.round)

    def _membership_changed(self):
        self._finish_round_if_complete()
        self._release()

    def _expire(self, now):
        gone = self.membership.expire(now)
        if gone:
            for worker in gone:
                self.log(f"server {self.index}: dropped worker {worker} (silent for more than "
                         f"{self.membership.timeout:g} s)")
            self._membership_changed()

    def _lr(self):
        if self.optimizer is None:
            return None
        lr = self.optimizer.param_groups[0]["lr"]
        return float(lr) if math.isfinite(lr) else None

    # ------------------------------------------------------------------------------------------ snapshots
    def snapshot(self):
        """Write this server's state to config.snapshot_path atomically; returns the path."""
        path = self.config.snapshot_path
        arrays = {f"param.{k}": self.shards[k].data for k in self.keys}
        optim_json, schedules = None, None
        if self.optimizer is not None:
            opt_arrays, optim_json = split_optimizer_state(self.optimizer.state_dict(), prefix="opt.")
            arrays.update(opt_arrays)
            schedules = self.schedules.state_dict() if self.schedules is not None else None
        meta = {"format": SNAPSHOT_FORMAT, "server": self.index, "servers": self.layout.num_servers,
                "fingerprint": self.layout.fingerprint, "keys": self.keys,
                "versions": [self.versions[k] for k in self.keys], "updates": self.updates, "round": self.round,
                "epoch": self.epoch, "optimizer": optim_json, "schedules": schedules, "time": time.time()}
        save_snapshot(path, arrays, meta)
        self._snapshot_at = self.updates
        self.snapshots += 1
        return path

    def _restore(self, path):
        arrays, meta = load_snapshot(path)
        expected = {"format": SNAPSHOT_FORMAT, "server": self.index, "servers": self.layout.num_servers,
                    "fingerprint": self.layout.fingerprint, "keys": self.keys}
        for name, value in expected.items():
            if meta.get(name) != value:
                raise SnapshotError(f"{path}: written by another setup ({name} is {meta.get(name)!r}, this server "
                                    f"has {value!r}); remove it to start afresh")
        for k in self.keys:
            data = arrays.get(f"param.{k}")
            if data is None or data.shape != self.shards[k].shape or data.dtype != self.shards[k].dtype:
                raise SnapshotError(f"{path}: part {k} missing or of another shape or dtype")
            self.shards[k].data = data
        if self.optimizer is not None:
            try:
                self.optimizer.load_state_dict(join_optimizer_state(arrays, meta["optimizer"], prefix="opt."))
                if self.schedules is not None and meta.get("schedules") is not None:
                    self.schedules.load_state_dict(meta["schedules"])
            except (KeyError, ValueError, TypeError) as exc:
                raise SnapshotError(f"{path}: optimizer state does not fit ({exc})") from None
        self.versions = dict(zip(self.keys, meta["versions"]))
        self.updates, self.round, self.epoch = meta["updates"], meta["round"], meta["epoch"]
        self._round = SyncRound(self.round)
        self._snapshot_at = self.updates
        self.log(f"server {self.index}: resumed from {path} ({self.updates} updates)")


def _all_finite(array):
    """True when every element is finite. A sum is one fast pass; only a non-finite sum needs a closer look
    (the sum of finite values can overflow)."""
    with np.errstate(over="ignore", invalid="ignore"):
        if np.isfinite(np.add.reduce(array, axis=None)):
            return True
    return bool(np.isfinite(array).all())
