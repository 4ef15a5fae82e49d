"""ParameterServer: owns its parts of the parameters and their optimizer; serves pull, push and control messages.

One thread, one ROUTER socket, one poll loop. For every message, in this order:
    0. protocol.receive: frame by frame, at most one frame per part this server holds plus the header, and at
       most the bytes those can take (the rest of a bigger message is dropped as it is read);
    1. decode_request: the header and frames on their own (protocol.py);
    2. the checks that need this server's state: the peer's key may act as that worker (CURVE), the worker
       joined on this connection, keys owned, dtypes and shapes equal to the server's, the clock the worker
       must be at, its epoch at most one past its last, gradients finite (unless allowed);
    3. only then the state changes: the gradient is applied (async, ssp) — and undone again, refused, if any
       parameter came out non-finite — then the clock advances; or the gradient is added to the round (sync);
       and the reply is sent, or, for a read the consistency model holds back, queued.
Anything failing in 0, 1 or 2 is answered with an error reply naming the problem and changes nothing. Should
anything else go wrong (a bug), a last-resort handler answers `internal`, logs the traceback and serves on:
no message ends the serve loop.

The update applies the server-side optimizer (disttrain.optim: SGD with momentum, Adam, AdamW) to the parts
that came in, then the per-update LR schedule; the per-epoch schedule follows the slowest live worker's epoch.
Each part is its own 1-D Parameter, so the optimizer's elementwise arithmetic is exactly that of local
training on the whole tensor. A part the push holds no gradient for (named in its `no_grad`: a frozen parameter,
or one this step did not use) keeps .grad = None and the optimizer skips it, as a local step skips a parameter
without a gradient (no momentum, no weight decay); a sync round averages what its workers sent (SyncRound).

NOTE (zero-copy replies): a params reply hands the parts' memory to ZMQ without copying (copy=False) and keeps
the frames' trackers. Before the optimizer next changes a part in place, the server checks them; if ZMQ may
still be reading that memory, the part gets a fresh copy first (copy-on-write), so a reply never carries a
half-updated part.

NOTE (snapshots): at start (unless it resumed from one), every `snapshot_every` updates and every
`snapshot_every_s` seconds with new updates, on request_stop() (SIGTERM in the CLI) and on close(), the server
writes parameters, optimizer state, LR schedules, versions, counters and every worker's clock and last push
atomically (snapshot.py). A new server started with the same snapshot path resumes from it and says from what;
see docs/PARAMSERVER.md for what a crash loses. A periodic snapshot that fails is an alert for the operator
(alerts.py) and the server serves on; a final one that fails makes close() raise FinalSnapshotError.
"""
import math
import secrets
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zmq

from disttrain.autograd.grad_mode import no_grad
from disttrain.nn.parameter import Parameter
from disttrain.paramserver import protocol
from disttrain.paramserver.alerts import ALERT_PREFIX, SnapshotFailures, kept_text, os_error_text
from disttrain.paramserver.consistency import Consistency, SyncRound
from disttrain.paramserver.membership import Membership
from disttrain.paramserver.protocol import ProtocolError, show
from disttrain.paramserver.refusals import RefusalLog
from disttrain.paramserver.rollback import Rollback
from disttrain.paramserver.snapshot import SnapshotError, load_snapshot, save_snapshot
from disttrain.tensor.tensor import Tensor
from disttrain.train.saving import join_optimizer_state, split_optimizer_state

__all__ = ["ServerConfig", "ParameterServer", "FinalSnapshotError"]

ZERO_COPY_BYTES = 1 << 16         # smaller arrays are copied into their frames (cheaper than tracking them)
SNAPSHOT_FORMAT = "disttrain-ps-shard"
MAX_READ_RECORDS = 10_000
RECEIVE_HWM = 16                  # messages queued per connection (a worker has at most two in flight)
BATCH = 1000                      # messages handled between two looks at the clock and the stop flag
REFUSAL_LOG_INTERVAL_S = 10.0     # the least between two refused messages logged, when log_every is 0


class FinalSnapshotError(RuntimeError):
    """The snapshot at close() could not be written; the message (one line) names the server, the file, the OS
    error and what the last good snapshot holds."""


@dataclass
class ServerConfig:
    consistency: str = "async"        # "async", "ssp" or "sync"
    staleness: int = 0                # ssp's bound s
    heartbeat_timeout: float = 10.0   # seconds of silence before a worker is dropped
    snapshot_every: int = 0           # updates between snapshots (0: not by count)
    snapshot_every_s: float = 0.0     # seconds between snapshots when there were updates (0: not by time)
    snapshot_path: object = None      # a file path, or None for no snapshots
    reject_nonfinite: bool = True     # refuse gradients holding NaN or inf, and updates that would make any
                                      # parameter so (undone: servers keep a copy of what an update touches)
    log_every: float = 10.0           # seconds between update-rate log lines (0: never), and the least between
                                      # two refused messages logged (0: REFUSAL_LOG_INTERVAL_S)
    expect_workers: int = 1           # ssp/sync: hold the first reads until this many workers joined ...
    start_timeout: float = 60.0       # ... or this many seconds passed since the first join
    max_epoch: int = 1000             # the largest epoch a worker may report (a job's `train.epochs`)


class ParameterServer:
    """Server `index` of layout.num_servers.

    initial: one array per layout parameter (the full tensors; the server keeps copies of its parts).
    make_optimizer(params) -> (optimizer, schedules): schedules has `.epoch` and `.step` (each a scheduler or
    None), `state_dict()` and `load_state_dict()` (disttrain.train.build.Schedules). It is not called when
    the server owns no part.
    security: an auth.ServerSecurity, or None for an insecure (loopback only) server.
    log(text): the server's log; what the operator must see (failed snapshots) goes there too, marked with
    alerts.ALERT_PREFIX.
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
        self._refusals = RefusalLog(self.log, f"server {index}", self.config.log_every or REFUSAL_LOG_INTERVAL_S)
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
        self.refused_updates = 0              # updates undone because a parameter came out non-finite
        self.internal_errors = 0              # messages answered by the last-resort handler
        self._rollback = Rollback()
        self.reads = []                       # ssp: (worker, clock, slowest live clock) of answered reads
        self.max_lead = 0                     # ssp: the largest clock - slowest clock ever answered
        self.snapshots = 0
        self.snapshot_updates = None          # the updates the last snapshot written (or restored) holds
        self._snapshot_failures = SnapshotFailures(self._alert, f"server {index}")
        self._snapshot_at = 0
        self._snapshot_time = time.monotonic()
        self._stop = False
        self._first_join = None
        self.started = self.consistency.mode == "async"          # ssp/sync: see _check_start
        self.context = self.socket = self.endpoint = None
        part_bytes = [p.length * np.dtype(layout.dtype_of(p)).itemsize for p in self.parts.values()]
        self._largest_frame = max(part_bytes + [protocol.MAX_HEADER_BYTES]) + protocol.FRAME_SLACK
        self._max_frames = 2 + len(self.keys)                  # routing id, header, one frame per part
        self._max_bytes = sum(part_bytes) + protocol.MAX_HEADER_BYTES + protocol.FRAME_SLACK
        self.restored = False
        path = self.config.snapshot_path
        if path is not None and Path(path).exists():
            self._restore(Path(path))
        elif path is not None:
            self.log(f"server {self.index}: no snapshot at {path}: starting from the initial weights")

    # ------------------------------------------------------------------------------------------ life cycle
    def start(self):
        """Bind the socket (and start the ZAP handler), then write the first snapshot unless this server
        resumed from one (so a server killed at any later moment restarts from a file); returns `endpoint`."""
        self.context = zmq.Context()
        if self.security is not None:
            self.security.start(self.context)
        sock = self.context.socket(zmq.ROUTER)
        sock.linger = 500
        sock.setsockopt(zmq.MAXMSGSIZE, self._largest_frame)
        sock.setsockopt(zmq.RCVHWM, RECEIVE_HWM)
        if self.security is not None:
            self.security.apply(sock)
        sock.bind(self.bind)
        self.socket = sock
        self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        if self.config.snapshot_path is not None and not self.restored:
            self.snapshot()
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
                    for _ in range(BATCH):
                        if self._stop:
                            break
                        try:
                            frames, problem = protocol.receive(self.socket, self._max_frames, self._max_bytes,
                                                               zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self._handle(frames, problem)
                now = time.monotonic()
                if now - last_check >= 0.1:
                    last_check = now
                    self._expire(now)
                    if not self.started and self._check_start(now):
                        self._release()
                    self._snapshot_if_due(now)
                if self.config.log_every and now - last_log >= self.config.log_every:
                    self._log_rate(now - last_log, self.updates - logged_updates)
                    last_log, logged_updates = now, self.updates
                if duration is not None and now - start >= duration:
                    break
        finally:
            self.close()

    def close(self):
        """Final snapshot (when configured), then close the socket, the ZAP handler and the context.

        Raises FinalSnapshotError (after closing) when the final snapshot cannot be written.
        """
        if self.socket is None:
            return
        failure = None
        if self.config.snapshot_path is not None:
            try:
                self.snapshot()
            except OSError as exc:
                failure = FinalSnapshotError(f"server {self.index} could not write its final snapshot "
                                             f"{self.config.snapshot_path}: {os_error_text(exc)}; "
                                             f"{kept_text(self.snapshot_updates, self.updates)} (a "
                                             f"restart or --resume loses the others)")
        self.socket.close()
        self.socket = None
        if self.security is not None:
            self.security.stop()
        self.context.term()
        self.context = None
        if failure is not None:
            raise failure

    def _alert(self, text):
        self.log(ALERT_PREFIX + text)

    def _log_rate(self, seconds, updates):
        clocks = self.membership.clocks()
        slowest = min(clocks.values()) if clocks else "-"
        self.log(f"server {self.index}: {updates / seconds:.1f} updates/s ({self.updates} total), "
                 f"{len(clocks)} workers live, slowest clock {slowest}, {self.rejected} rejected")

    # ------------------------------------------------------------------------------------------ dispatch
    def _handle(self, frames, problem=None):
        self.requests += 1
        identity, body = frames[0].bytes, frames[1:]
        try:
            if problem is not None:
                raise problem
            header, arrays = protocol.decode_request(body)
            client = self.security.client(frames[0]) if self.security is not None else None
            handler = getattr(self, "_on_" + header["op"])
            handler(identity, client, header, arrays)
        except ProtocolError as exc:
            self.rejected += 1
            self._refusals.refused(identity, exc.code, str(exc))
            self._answer_error(identity, body, exc.code, str(exc))
        except Exception as exc:          # a bug: answer and log it, never let one message end the server
            self.rejected += 1
            self.internal_errors += 1
            self.log(f"server {self.index}: internal error handling a message; it was refused and the server "
                     f"goes on:\n{traceback.format_exc(limit=20)}")
            self._answer_error(identity, body, "internal", f"server {self.index}: internal error "
                                                           f"({type(exc).__name__}); see the server's log")

    def _answer_error(self, identity, body, code, message):
        self._send(identity, protocol.error_reply(protocol.peek_seq(body) if body else None, self.incarnation,
                                                  code, message))

    def _send(self, identity, frames):
        try:
            self.socket.send_multipart([identity, *frames], copy=False)
        except zmq.ZMQError as exc:       # the peer went away: nothing to answer
            self.log(f"server {self.index}: reply not sent ({exc})")

    def _reply(self, identity, op, seq, **fields):
        self._send(identity, protocol.encode(protocol.reply(op, seq, self.incarnation, **fields)))

    # ------------------------------------------------------------------------------------------ control
    def _on_join(self, identity, client, header, _):
        if header["fingerprint"] != self.layout.fingerprint:
            raise ProtocolError("layout_mismatch", "the worker's parameter layout differs from this server's "
                                                   "(another model, dtype or number of servers)")
        worker, now, observer = header["worker"], time.monotonic(), header.get("observer", False)
        self._authorize_join(client, worker, observer)
        epoch = header.get("epoch", 0)
        if epoch > self.config.max_epoch:
            raise ProtocolError("bad_epoch", f"worker {worker} says it finished {epoch} epochs; this job has "
                                             f"{self.config.max_epoch}")
        last_push = None
        if observer:
            if worker in self.membership.workers:
                raise ProtocolError("bad_field", f"worker {worker} is joined as a worker; observers need another id")
            self.membership.join_observer(worker, identity)
            clock = 0
        else:
            state = self.membership.get(worker)
            if state is None:
                clock, last_push = self._place_newcomer(worker, header["clock"])
                self.membership.observers.pop(worker, None)
            else:
                clock, last_push = state.clock, state.last_push
            self.membership.join(worker, identity, clock, epoch, now, last_push)
            self.log(f"server {self.index}: worker {worker} joined at clock {clock}")
            if self._first_join is None:
                self._first_join = now
            if not self.started and self._check_start(now):
                self._release()
        extra = {"last_push": last_push} if last_push is not None else {}
        self._reply(identity, "joined", header["seq"], worker=worker, clock=clock, server=self.index,
                    mode=self.consistency.mode, staleness=self.consistency.staleness, updates=self.updates, **extra)

    def _authorize_join(self, client, worker, observer):
        """Under CURVE a key acts only as what its name says (auth.py): worker-K as worker K, other keys only as
        observers. Without CURVE (--insecure, loopback only) nothing tells peers apart: anyone may join."""
        if self.security is None:
            return
        if client is None:
            raise ProtocolError("forbidden", "this connection's key is no longer in the client list")
        if client.worker is not None and client.worker != worker:
            raise ProtocolError("forbidden", f"key {client.name} may join only as worker {client.worker}, "
                                             f"not as {worker}")
        if client.worker is None and not observer:
            raise ProtocolError("forbidden", f"key {client.name} is not a worker key (worker-K): it may join only "
                                             f"as an observer")

    def _check_start(self, now):
        """ssp/sync start together: the first reads wait for `expect_workers` joins (or `start_timeout`), so a
        sync job's first steps average every worker's gradient, as local training on the combined batch would."""
        if self.updates or len(self.membership.workers) >= self.config.expect_workers or (
                self._first_join is not None and now - self._first_join >= self.config.start_timeout):
            self.started = True
        return self.started

    def _place_newcomer(self, worker, requested):
        """(clock, last_push) of a worker that is not live here. The server, not the worker, sets the clock:
        a worker seen before (dropped, departed, or in the restored snapshot) continues from its remembered
        clock, moved up to the slowest live one so that it holds nobody back; a new one starts at the slowest
        live clock (sync: the current round, or the next when its push is in the current one already). `requested`, the clock the worker had here before, only serves
        to say how many of its updates this server lost (a restart from an older snapshot, or none)."""
        known = self.membership.recall(worker)
        clock, last_push = known if known is not None else (0, None)
        if self.consistency.aggregates:
            # its gradient for the current round, if it sent one, is in the round already: it reads that round's
            # result and pushes for the next (a second push into this round would count it twice)
            clock = self.round + 1 if last_push == self.round else self.round
        else:
            clock = max(clock, self.membership.min_clock() or 0)
        if requested > clock:
            self.log(f"server {self.index}: worker {worker} was at clock {requested} here and continues at "
                     f"{clock}: {requested - clock} of its {'rounds' if self.consistency.aggregates else 'updates'} "
                     f"were lost when this server restarted "
                     f"{'from an older snapshot' if self.restored else 'without a snapshot'}")
        return clock, last_push

    def _on_leave(self, identity, client, header, _):
        worker = header["worker"]
        self._check_connection(identity, worker, allow_observer=True)
        self.membership.leave(worker)
        self.log(f"server {self.index}: worker {worker} left")
        self._membership_changed()
        self._reply(identity, "ok", header["seq"])

    def _on_heartbeat(self, identity, client, header, _):
        worker = header["worker"]
        self._check_connection(identity, worker, allow_observer=True)
        self.membership.touch(worker, time.monotonic())
        slowest = self.membership.min_clock()
        self._reply(identity, "ok", header["seq"], **({"min_clock": slowest} if slowest is not None else {}))

    def _on_stats(self, identity, client, header, _):
        if not (client is not None and client.admin) and not self.membership.joined_on(identity):
            raise ProtocolError("forbidden", "stats are answered on a connection that joined (as a worker or an "
                                             "observer) or to the admin key")
        stats = {"server": self.index, "updates": self.updates, "requests": self.requests, "rejected": self.rejected,
                 "refused_updates": self.refused_updates, "internal_errors": self.internal_errors,
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

    def _on_pull(self, identity, client, header, _):
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

    def _on_push(self, identity, client, header, arrays):
        worker, keys, clock = header["worker"], header["keys"], header["clock"]
        no_grad = header.get("no_grad", [])
        self._check_ahead(header)
        state = self._check_connection(identity, worker)
        self._owned(keys)
        self._owned(no_grad)
        if self.consistency.aggregates and sorted(keys + no_grad) != self.keys:
            raise ProtocolError("bad_key", f"sync mode: a push must name every key of server {self.index} "
                                           f"({len(self.keys)} keys) in keys or no_grad, got {len(keys)} and "
                                           f"{len(no_grad)}")
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
        epoch = max(state.epoch, header.get("epoch", 0))
        if epoch > state.epoch + 1:
            raise ProtocolError("bad_epoch", f"worker {worker} was in epoch {state.epoch}; a push may move it on "
                                             f"by one epoch at most, this one says {header['epoch']}")
        if not duplicate and self.config.reject_nonfinite:
            for key, array in zip(keys, arrays):
                if not _all_finite(array):
                    raise ProtocolError("nonfinite", f"key {key}: the gradient holds NaN or inf; this job "
                                                     f"refuses non-finite gradients")
        # ---- every check passed: change state (an async/ssp update that comes out non-finite is undone) ----
        refused = None
        if not duplicate:
            grads = dict(zip(keys, arrays))
            if self.consistency.aggregates:
                self._commit_push(state, clock, epoch)
                self._round.add(worker, grads)
                refused = self._finish_round_if_complete()
            else:
                self._apply(grads, epoch_target=self._epoch_target(worker, epoch))
                self._commit_push(state, clock, epoch)
        self.membership.touch(worker, time.monotonic())
        self._snapshot_if_due()
        if refused is not None:
            self._release()
            raise refused
        if header.get("pull", False):
            self._read(identity, worker, header["seq"], self.keys, None, state.clock, header.get("ahead", False))
        else:
            self._reply(identity, "ok", header["seq"], clock=state.clock, lr=self._lr())
        if not duplicate:
            self._release()

    @staticmethod
    def _commit_push(state, clock, epoch):
        state.clock, state.last_push, state.epoch = clock + 1, clock, epoch

    def _epoch_target(self, worker, epoch):
        """The slowest live worker's epoch, counting `worker` at `epoch`: what the per-epoch schedule follows."""
        return min(epoch if w == worker else s.epoch for w, s in self.membership.workers.items())

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
    def _apply(self, grads, epoch_target=None):
        """One optimizer update of the parts in `grads` ({key: array of the part's shape and dtype}), after
        stepping the per-epoch schedule up to `epoch_target` (default: the slowest live worker's epoch).

        Raises ProtocolError("nonfinite_update") with everything (parts, optimizer state, schedules, epoch)
        put back as it was when a part comes out holding NaN or inf.
        """
        touched = [self.shards[k] for k in grads]
        for key, shard in zip(grads, touched):
            if any(not t.done for t in self._inflight[key]):
                shard.data = shard.data.copy()     # copy-on-write: ZMQ may still be sending the old memory
                self.copies_on_write += 1
            self._inflight[key] = []
        guard = bool(touched) and self.config.reject_nonfinite
        if guard:
            self._rollback.save(touched, self.optimizer)
        epoch_before = self._step_epochs(self.membership.min_epoch() if epoch_target is None else epoch_target)
        for shard, g in zip(touched, grads.values()):
            shard.grad = Tensor(g)
        if touched:
            with no_grad(), np.errstate(over="ignore", invalid="ignore"):      # the result is checked below
                self.optimizer.step()
        for shard in touched:
            shard.grad = None
        bad = [key for key, shard in zip(grads, touched) if guard and not self._finite_after_update(shard)]
        if bad:
            self._rollback.restore()
            if epoch_before is not None:
                self._restore_epochs(*epoch_before)
            self.refused_updates += 1
            raise ProtocolError("nonfinite_update", f"server {self.index}: the update would make part(s) "
                                                    f"{show(bad)} (or their optimizer state) hold NaN or inf; it "
                                                    f"was undone (lr {self._lr()}): finite gradients, too large")
        for key in grads:
            self.versions[key] += 1
        self.updates += 1
        if self.schedules is not None and self.schedules.step is not None:
            self.schedules.step.step()

    def _finite_after_update(self, shard):
        """The part and its optimizer state (momentum, Adam's moments) hold no NaN or inf: an inf moment would
        freeze or poison the part at a later update."""
        state = self.optimizer.state.get(shard, {})
        return _all_finite(shard.data) and all(_all_finite(v) for v in state.values() if isinstance(v, np.ndarray))

    def _step_epochs(self, target):
        """Step the per-epoch schedule until self.epoch reaches `target` (at most max_epoch steps: join and
        push bound every worker's epoch); returns what _restore_epochs needs to undo it, or None."""
        if target is None or self.epoch >= min(target, self.config.max_epoch):
            return None
        schedule = self.schedules.epoch if self.schedules is not None else None
        before = (self.epoch, schedule.state_dict() if schedule is not None else None,
                  [g["lr"] for g in self.optimizer.param_groups] if self.optimizer is not None else [])
        steps = min(target, self.config.max_epoch) - self.epoch
        for _ in range(steps if schedule is not None else 0):
            schedule.step()
        self.epoch += steps
        return before

    def _restore_epochs(self, epoch, schedule_state, lrs):
        self.epoch = epoch
        if schedule_state is not None:
            self.schedules.epoch.load_state_dict(schedule_state)
        for group, lr in zip(self.optimizer.param_groups if lrs else (), lrs):
            group["lr"] = lr

    def _finish_round_if_complete(self):
        """Apply a complete sync round. Returns the ProtocolError of an update refused as non-finite (the
        round is then dropped: parameters unchanged, the next round starts), else None."""
        if not (self.consistency.aggregates and self._round.complete(self.membership.live())):
            return None
        refused = None
        try:
            self._apply(self._round.mean())
        except ProtocolError as exc:
            refused = exc
            self.log(f"server {self.index}: round {self.round} dropped: {exc}")
        self.round += 1
        self._round = SyncRound(self.round)
        return refused

    def _membership_changed(self):
        self._finish_round_if_complete()
        self._snapshot_if_due()
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
        cap = self.round - 1 if self.consistency.aggregates else None    # pushes of an unfinished round
        workers = {str(w): entry for w, entry in self.membership.history(last_push_cap=cap).items()}
        meta = {"format": SNAPSHOT_FORMAT, "server": self.index, "servers": self.layout.num_servers,
                "fingerprint": self.layout.fingerprint, "keys": self.keys,
                "versions": [self.versions[k] for k in self.keys], "updates": self.updates, "round": self.round,
                "epoch": self.epoch, "optimizer": optim_json, "schedules": schedules, "time": time.time(),
                "workers": workers}
        save_snapshot(path, arrays, meta)
        self._snapshot_at = self.snapshot_updates = self.updates
        self._snapshot_time = time.monotonic()
        self.snapshots += 1
        self._snapshot_failures.written(path)
        return path

    def _snapshot_if_due(self, now=None):
        """Snapshot after `snapshot_every` updates, or `snapshot_every_s` seconds with updates. Called between
        messages, never inside an update: the worker clocks it records must match the parameters."""
        if self.config.snapshot_path is None or self.updates == self._snapshot_at:
            return
        by_count = self.config.snapshot_every and self.updates - self._snapshot_at >= self.config.snapshot_every
        by_time = self.config.snapshot_every_s and (now or time.monotonic()) - self._snapshot_time >= \
            self.config.snapshot_every_s
        if not (by_count or by_time):
            return
        try:
            self.snapshot()
        except OSError as exc:          # e.g. a full disk: serve on, say so, and try again at the next due time
            self._snapshot_at, self._snapshot_time = self.updates, time.monotonic()
            self._snapshot_failures.failed(self.config.snapshot_path, exc, self.updates, self.snapshot_updates)

    def _restore(self, path):
        arrays, meta = load_snapshot(path)
        expected = {"format": SNAPSHOT_FORMAT, "server": self.index, "servers": self.layout.num_servers,
                    "fingerprint": self.layout.fingerprint, "keys": self.keys}
        for name, value in expected.items():
            if meta.get(name) != value:
                raise SnapshotError(f"{path}: written by another setup ({name} is {show(meta.get(name))}, this "
                                    f"server has {show(value)}); remove it to start afresh")
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
                raise SnapshotError(f"{path}: optimizer state does not fit ({show(str(exc), 200)})") from None
        try:
            self.versions = dict(zip(self.keys, (protocol.check_clock(v, "versions") for v in meta["versions"]),
                                     strict=True))
            self.updates, self.round = (protocol.check_clock(meta[k], k) for k in ("updates", "round"))
            self.epoch = protocol.check_clock(meta["epoch"], "epoch")
            self.membership.restore_history(_history(meta.get("workers", {})))
        except (KeyError, TypeError, ValueError) as exc:
            raise SnapshotError(f"{path}: counters unreadable ({show(str(exc), 200)})") from None
        self._round = SyncRound(self.round)
        self._snapshot_at = self.snapshot_updates = self.updates
        self.restored = True
        written = meta.get("time")
        age = f", written {time.time() - written:.1f} s ago" if isinstance(written, (int, float)) else ""
        self.log(f"server {self.index}: resumed from {path}{age}: {self.updates} updates, round {self.round}, "
                 f"epoch {self.epoch}, the clocks of {len(self.membership.remembered)} worker(s)")


def _history(workers):
    """The snapshot's {"id": [clock, last_push or None]} as Membership.restore_history takes it (checked)."""
    if not isinstance(workers, dict):
        raise TypeError(f"workers must be a map, got {show(workers)}")
    history = {}
    for key, entry in workers.items():
        worker = protocol.check_worker(int(key), "worker id")
        if not isinstance(entry, list) or len(entry) != 2:
            raise TypeError(f"worker {worker}: expected [clock, last_push], got {show(entry)}")
        clock, last_push = entry
        history[worker] = (protocol.check_clock(clock, "clock"),
                           None if last_push is None else protocol.check_clock(last_push, "last_push"))
    return history


def _all_finite(array):
    """True when every element is finite. A sum is one fast pass; only a non-finite sum needs a closer look
    (the sum of finite values can overflow)."""
    with np.errstate(over="ignore", invalid="ignore"):
        if np.isfinite(np.add.reduce(array, axis=None)):
            return True
    return bool(np.isfinite(array).all())
