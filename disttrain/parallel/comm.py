"""Communicator: the few MPI calls disttrain uses, over mpi4py, on NumPy and CuPy buffers.

    comm = world()                       # MPI_COMM_WORLD (MPI starts on the first call, not at import)
    comm.Allreduce(grads)                # in place, buffer-based
    handle = comm.Iallreduce(bucket)     # non-blocking; handle.test() / handle.wait()
    handle = comm.Ireduce_scatter_block(grads, my_block)   # and Iallgather(my_block, everyone): sharded state
    rows = comm.Split(color=comm.rank // 4)   # sub-communicators (pipeline x data)
    comm.Isend(activations, dest=1, tag=3)    # point-to-point between pipeline stages (Handle as above)

Methods named after MPI calls take array buffers and use mpi4py's upper-case, buffer-based calls (no
object serialisation): these are the ones on hot paths. The few `*_object` methods use mpi4py's lower-case
calls, which serialise Python objects; they carry small metadata (parameter names and shapes, error reports)
between the ranks of one mpirun job only, at setup and at the end, never data from outside the job.

Buffers: NumPy arrays go to MPI as they are. A CuPy array goes as it is when the MPI is CUDA-aware (the
producing stream is synchronised first), otherwise through host staging: copied into a host buffer, reduced
there, copied back when the operation completes. Whether the MPI is CUDA-aware cannot be asked portably, so
it is the `cuda_aware` argument or the DISTTRAIN_CUDA_AWARE_MPI environment variable (1/0), host staging
by default (always correct, one copy each way).

NOTE (threads): every MPI call made through this module holds one process-wide lock. The data-parallel
progress thread tests requests while the main thread computes, and MPI forbids completing one request from
two threads at once (and, below MPI_THREAD_MULTIPLE, any concurrent calls); the lock rules both out for the
price of an uncontended acquire per call.

NOTE (bounded waits): every operation that can block, blocking methods and object collectives included,
starts as a non-blocking one and completes through the communicator's Watchdog (watchdog.py), which ends
the job with a report naming the ranks that did not arrive when a wait passes its timeout (`set_timeout`;
[parallel] timeout_s in jobs). Each operation is described for that report: what it is for (the `what`
argument, e.g. "allreduce of gradient bucket 2"), and a key equal on every rank that takes part: the
communicator's name and the number of collectives started on it (the same on every member, since all
members start the same collectives in the same order), or for a message the two world ranks and its tag.
Sub-communicators are named after their parent ("world/1:0": split 1 of world, color 0).
"""
import contextlib
import os
import sys
import threading
import time
import traceback

import msgpack
import numpy as np

from disttrain import trace
from disttrain.parallel.watchdog import DEFAULT_TIMEOUT_S, Watchdog, operation
from disttrain.tensor import cuda_available

__all__ = ["Communicator", "Handle", "HostStaging", "world", "abort_on_error", "cuda_aware_default"]

_LOCK = threading.RLock()
_world = None


def _mpi():
    """mpi4py's MPI module; importing it initialises MPI, so this is only called when MPI is needed."""
    try:
        from mpi4py import MPI
    except ImportError as exc:  # pragma: no cover - mpi4py is a dependency
        raise ImportError("disttrain.parallel needs mpi4py (and an MPI library: `pip install mpich` on one "
                          "machine, or mpi4py built against the cluster's MPI)") from exc
    return MPI


def world():
    """The communicator of all processes of the job (MPI_COMM_WORLD), created once, with a Watchdog bounding
    its waits by DEFAULT_TIMEOUT_S (Communicator.set_timeout changes it for every communicator of the job)."""
    global _world
    if _world is None:
        _world = Communicator(_mpi().COMM_WORLD, watchdog=_start_watchdog(_mpi().COMM_WORLD))
    return _world


def _start_watchdog(comm):
    """The job's Watchdog, with a duplicate of `comm` of its own for time-out reports (a bounded collective:
    a rank that never starts ends the job after DEFAULT_TIMEOUT_S instead of hanging it)."""
    rank, size = comm.Get_rank(), comm.Get_size()
    if size == 1:
        return Watchdog(None, rank, size, _LOCK)
    with _LOCK:
        private, request = comm.Idup()
    bootstrap = Watchdog(None, rank, size, _LOCK)
    bootstrap.wait(Handle(request), operation("start-up (duplicating the world communicator)", ("world", 0),
                                              tuple(range(size))))
    return Watchdog(private, rank, size, _LOCK)


def cuda_aware_default():
    """True when DISTTRAIN_CUDA_AWARE_MPI is set to 1/true/yes: pass device buffers to MPI directly."""
    return os.environ.get("DISTTRAIN_CUDA_AWARE_MPI", "").strip().lower() in ("1", "true", "yes")


def is_device_array(buf):
    """A GPU array (CuPy, or anything exposing __cuda_array_interface__)."""
    return hasattr(buf, "__cuda_array_interface__")


class HostStaging:
    """Host copies of device buffers for an MPI that cannot read GPU memory.

    stage(array) copies the device array into a host buffer (taken from a pool, pinned when CuPy is there)
    and returns that buffer shaped and typed like the array; unstage(host, array) copies the result back and
    returns the buffer to the pool. Device arrays need CuPy's two copy methods: `get(out=host)` and
    `set(host)`; tests stand NumPy-backed objects with those methods in for CuPy arrays.
    """

    def __init__(self, allocate=None):
        self._allocate = allocate or _pinned_or_plain
        self._free = {}          # nbytes -> [uint8 host buffers]

    def stage(self, array, copy_in=True):
        nbytes = int(array.nbytes)
        pool = self._free.get(nbytes)
        raw = pool.pop() if pool else self._allocate(nbytes)
        host = raw.view(np.dtype(array.dtype)).reshape(array.shape)
        if copy_in:
            array.get(out=host)
        return host

    def unstage(self, host, array, copy_back=True):
        if copy_back:
            array.set(host)
        raw = host.reshape(-1).view(np.uint8)
        self._free.setdefault(raw.nbytes, []).append(raw)


def _pinned_or_plain(nbytes):
    """A host buffer of nbytes: page-locked when a GPU is there (faster copies), plain NumPy otherwise."""
    if not cuda_available():
        return np.empty(nbytes, dtype=np.uint8)
    import cupyx

    return cupyx.empty_pinned((nbytes,), dtype=np.uint8)


class Handle:
    """A non-blocking operation in flight: `test()` drives MPI progress and says whether it is complete;
    `wait()` blocks until it is, then copies staged results back to the device.

    test() may be called from any thread (the data-parallel progress thread does); wait() belongs to the
    thread that started the operation, so device copies stay on that thread's device and stream.
    `completed_at` is the trace clock when completion was first observed, for timelines.
    """

    __slots__ = ("_request", "_finish", "done", "started_at", "completed_at", "op", "watchdog")

    def __init__(self, request, finish=None, op=None, watchdog=None):
        self._request = request
        self._finish = finish
        self.done = False
        self.started_at = trace.now()
        self.completed_at = None
        self.op = op                  # what the watchdog reports if the wait times out
        self.watchdog = watchdog      # None: wait without a bound

    def test(self):
        if not self.done:
            with _LOCK:
                if not self.done and self._request.Test():
                    self._mark_done()
        return self.done

    def wait(self, sleep=None):
        """sleep: seconds between tests while a watchdog bounds the wait (default: its own choice)."""
        if not self.done and self.watchdog is not None:
            self.watchdog.wait(self, self.op, sleep)
        if not self.done:
            with _LOCK:
                if not self.done:
                    self._request.Wait()
                    self._mark_done()
        if self._finish is not None:
            finish, self._finish = self._finish, None
            finish()

    def _mark_done(self):
        self.completed_at = trace.now()
        self.done = True


class Communicator:
    """A wrapper of one mpi4py communicator: rank, size, buffer collectives, sub-communicators, Abort.

    name: how time-out reports call it (sub-communicators get "<parent>/<split>:<color>"); watchdog: the
    job's Watchdog, shared with sub-communicators (None: waits are unbounded).
    """

    def __init__(self, mpi_comm, cuda_aware=None, name="world", watchdog=None):
        self._comm = mpi_comm
        self.rank = mpi_comm.Get_rank()
        self.size = mpi_comm.Get_size()
        self.cuda_aware = cuda_aware_default() if cuda_aware is None else bool(cuda_aware)
        self._staging = HostStaging()
        self.name = name
        self.watchdog = watchdog
        self._world_ranks = None
        self._collectives = 0       # collectives started here: the same count on every member
        self._children = 0          # sub-communicators made from this one

    @property
    def mpi_comm(self):
        """The underlying mpi4py communicator (for calls this class does not wrap)."""
        return self._comm

    @property
    def world_ranks(self):
        """The MPI_COMM_WORLD rank of each rank of this communicator."""
        if self._world_ranks is None:
            self._world_ranks = _world_ranks(self._comm)
        return self._world_ranks

    def __repr__(self):
        return f"<Communicator {self.name} rank {self.rank} of {self.size}>"

    def set_timeout(self, seconds):
        """Bound every wait of the job's communicators by `seconds` (None: no bound)."""
        if self.watchdog is not None:
            self.watchdog.timeout_s = seconds

    # ---- sub-communicators -----------------------------------------------------------------
    def Split(self, color, key=None):
        """Ranks passing the same color form a new communicator, ordered by key (default: this rank)."""
        self._children += 1
        name = f"{self.name}/{self._children}:{int(color)}"
        # MPI has no non-blocking split: a bounded barrier first, so a missing rank is reported, not waited for
        self.Barrier(what=f"creating communicator {name}")
        with _LOCK:
            sub = self._comm.Split(int(color), self.rank if key is None else int(key))
        return Communicator(sub, self.cuda_aware, name, self.watchdog)

    def Dup(self):
        """A communicator over the same ranks whose messages never match this one's."""
        self._children += 1
        name = f"{self.name}/{self._children}"
        with _LOCK:
            dup, request = self._comm.Idup()
        self._wait(request, _nothing, self._collective(f"creating communicator {name}"))
        return Communicator(dup, self.cuda_aware, name, self.watchdog)

    def supports_threads(self):
        """Whether a second thread may make MPI calls (serialised by this module's lock)."""
        MPI = _mpi()
        return MPI.Query_thread() >= MPI.THREAD_SERIALIZED

    # ---- buffer collectives (hot paths) ------------------------------------------------------
    def Barrier(self, what="barrier"):
        with _LOCK:
            request = self._comm.Ibarrier()
        self._wait(request, _nothing, self._collective(what))

    def Allreduce(self, buf, op="sum", what="allreduce"):
        """Reduce `buf` over all ranks, in place; returns buf."""
        if self.size == 1:
            _op(op)
            return buf
        self.Iallreduce(buf, op, what).wait()
        return buf

    def Iallreduce(self, buf, op="sum", what="allreduce"):
        """Start reducing `buf` in place over all ranks; returns a Handle. `buf` must not be touched until
        the handle completes."""
        mpi_op = _op(op)
        target, finish = self._prepare(buf)
        with _LOCK:
            request = self._comm.Iallreduce(_mpi().IN_PLACE, target, op=mpi_op)
        return self._handle(request, finish, self._collective(what))

    def Bcast(self, buf, root=0, what="broadcast"):
        """Overwrite `buf` on every rank with root's; returns buf."""
        if self.size == 1:
            return buf
        target, finish = self._prepare(buf, copy_in=self.rank == root, copy_out=self.rank != root)
        with _LOCK:
            request = self._comm.Ibcast(target, root=root)
        self._wait(request, finish, self._collective(what))
        return buf

    def Allgather(self, sendbuf, recvbuf=None, what="allgather"):
        """Every rank's `sendbuf` side by side: recvbuf has shape (size, *sendbuf.shape); returns recvbuf."""
        if recvbuf is None:
            xp = np if not is_device_array(sendbuf) else _array_module(sendbuf)
            recvbuf = xp.empty((self.size,) + tuple(sendbuf.shape), dtype=sendbuf.dtype)
        self.Iallgather(sendbuf, recvbuf, what).wait()
        return recvbuf

    def Iallgather(self, sendbuf, recvbuf, what="allgather"):
        """Start gathering every rank's `sendbuf` into `recvbuf` (size x sendbuf.size elements, in rank order);
        returns a Handle. Neither buffer may be touched until it completes."""
        _check_blocks("Iallgather", recvbuf, sendbuf, self.size)
        send, sent = self._prepare(sendbuf, copy_out=False)
        target, finish = self._prepare(recvbuf, copy_in=False)
        with _LOCK:
            request = self._comm.Iallgather(send, target)
        return self._handle(request, lambda: (sent(), finish()), self._collective(what))

    def Ireduce_scatter_block(self, sendbuf, recvbuf, op="sum", what="reduce-scatter"):
        """Start reducing `sendbuf` (size blocks of recvbuf.size elements) over all ranks, block r of the result
        landing in rank r's `recvbuf`; returns a Handle. Neither buffer may be touched until it completes."""
        mpi_op = _op(op)
        _check_blocks("Ireduce_scatter_block", sendbuf, recvbuf, self.size)
        send, sent = self._prepare(sendbuf, copy_out=False)
        target, finish = self._prepare(recvbuf, copy_in=False)
        with _LOCK:
            request = self._comm.Ireduce_scatter_block(send, target, op=mpi_op)
        return self._handle(request, lambda: (sent(), finish()), self._collective(what))

    # ---- point-to-point (pipeline stages) -------------------------------------------------------
    def Send(self, buf, dest, tag=0, what="send"):
        """Send `buf` to rank `dest` (blocking until the buffer may be reused)."""
        self.Isend(buf, dest, tag, what).wait()

    def Recv(self, buf, source, tag=0, what="receive"):
        """Receive into `buf` (its shape and dtype must match the message) from rank `source`; returns buf."""
        self.Irecv(buf, source, tag, what).wait()
        return buf

    def Isend(self, buf, dest, tag=0, what="send"):
        """Start sending `buf` to rank `dest`; returns a Handle. `buf` must not change until it completes."""
        send, sent = self._prepare(buf, copy_out=False)
        with _LOCK:
            request = self._comm.Isend(send, dest=int(dest), tag=int(tag))
        return self._handle(request, sent, self._message(what, dest, tag))

    def Irecv(self, buf, source, tag=0, what="receive"):
        """Start receiving into `buf` from rank `source`; returns a Handle (buf holds the message after
        wait(); a device array is filled from its host staging buffer then)."""
        target, finish = self._prepare(buf, copy_in=False)
        with _LOCK:
            request = self._comm.Irecv(target, source=int(source), tag=int(tag))
        return self._handle(request, finish, self._message(what, source, tag))

    # ---- small objects (setup, error reports, end of run: never on hot paths) ----------------
    # msgpack, not pickle: decoding bytes from the network must never run code. Plain data only (None, bool,
    # numbers, str, bytes, lists, tuples, dicts), each coming back as the type it went as.
    def allgather_object(self, obj, what="allgather of metadata"):
        """Every rank's plain-data `obj`, in rank order (as mpi4py's allgather, over bounded buffer calls)."""
        if self.size == 1:
            return [obj]
        data, counts = self._sizes(obj, what)
        everything = np.empty(int(counts.sum()), dtype=np.uint8)
        spec = [everything, (counts, _displacements(counts)), _mpi().BYTE]
        with _LOCK:
            request = self._comm.Iallgatherv([data, _mpi().BYTE], spec)
        self._wait(request, _nothing, self._collective(what))
        return _decode_parts(everything, counts)

    def gather_object(self, obj, root=0, what="gather of metadata"):
        """Every rank's plain-data `obj` in rank order on `root`, None elsewhere."""
        if self.size == 1:
            return [obj]
        data, counts = self._sizes(obj, what)
        everything = np.empty(int(counts.sum()), dtype=np.uint8) if self.rank == root else None
        spec = [everything, (counts, _displacements(counts)), _mpi().BYTE] if self.rank == root else None
        with _LOCK:
            request = self._comm.Igatherv([data, _mpi().BYTE], spec, root=root)
        self._wait(request, _nothing, self._collective(what))
        return _decode_parts(everything, counts) if self.rank == root else None

    def bcast_object(self, obj, root=0, what="broadcast of metadata"):
        """Root's plain-data `obj` on every rank."""
        if self.size == 1:
            return obj
        data = np.frombuffer(_encode(obj), dtype=np.uint8) if self.rank == root else None
        size = np.array([data.size if data is not None else 0], dtype=np.int64)
        self.Bcast(size, root, what)
        buffer = data.copy() if data is not None else np.empty(int(size[0]), dtype=np.uint8)
        self.Bcast(buffer, root, what)
        return obj if self.rank == root else _decode(buffer.tobytes())

    def _sizes(self, obj, what):
        """(this rank's encoded bytes, every rank's byte count)."""
        data = np.frombuffer(_encode(obj), dtype=np.uint8)
        counts = self.Allgather(np.array([data.size], dtype=np.int64), what=what).reshape(-1)
        return data, counts

    # ---- ending the job ------------------------------------------------------------------------
    def Abort(self, code=1):
        """End every process of the job now (MPI_Abort): what a failing rank must do instead of exiting
        while the others wait in a collective for it."""
        sys.stdout.flush()
        sys.stderr.flush()
        time.sleep(0.5)     # let the launcher forward this rank's last output: the abort kills its pipes
        self._comm.Abort(int(code))
        os._exit(int(code))    # not reached: MPI_Abort does not return (and no caller may run on if it did)

    # ---- waits -----------------------------------------------------------------------------------
    def _collective(self, what):
        self._collectives += 1
        return operation(f"{what} on {self.name}", (self.name, self._collectives), self.world_ranks)

    def _message(self, what, peer, tag):
        me, them = self.world_ranks[self.rank], self.world_ranks[int(peer)]
        return operation(f"{what} (rank {me} with rank {them}, tag {tag})",
                         (self.name, "p2p", min(me, them), max(me, them), int(tag)), (them,))

    def _handle(self, request, finish, op):
        return Handle(request, finish, op, self.watchdog)

    def _wait(self, request, finish, op):
        self._handle(request, finish, op).wait()

    # ---- buffers -------------------------------------------------------------------------------
    def _prepare(self, buf, copy_in=True, copy_out=True):
        """(what to hand MPI, what to call when the operation is complete) for `buf`.

        copy_in=False: MPI only writes the buffer (a receive); copy_out=False: MPI only reads it (a send).
        """
        if not is_device_array(buf):
            if not (isinstance(buf, np.ndarray) and buf.flags.c_contiguous):
                raise ValueError(f"MPI buffers must be C-contiguous NumPy or CuPy arrays, got "
                                 f"{type(buf).__name__} {getattr(buf, 'shape', '')}")
            return buf, _nothing
        if self.cuda_aware:
            _synchronize_device(buf)
            return buf, _nothing
        return staged(self._staging, buf, copy_in, copy_out)


def staged(staging, array, copy_in=True, copy_out=True):
    """Host staging of one device array: (host buffer for MPI, completion callback copying it back)."""
    host = staging.stage(array, copy_in)

    def finish():
        staging.unstage(host, array, copy_out)

    return host, finish


def _nothing():
    pass


def _check_blocks(call, whole, block, size):
    """`whole` must hold `size` blocks of `block`'s size and dtype (MPI would read or write past a buffer)."""
    if whole.size != size * block.size or whole.dtype != block.dtype:
        raise ValueError(f"{call}: needs {size} x {block.size} elements of {block.dtype} (one block per rank), "
                         f"got {whole.size} of {whole.dtype}")


def _world_ranks(mpi_comm):
    """The MPI_COMM_WORLD rank of every rank of `mpi_comm`, in its rank order."""
    MPI = _mpi()
    if mpi_comm == MPI.COMM_WORLD:
        return tuple(range(mpi_comm.Get_size()))
    group, world_group = mpi_comm.Get_group(), MPI.COMM_WORLD.Get_group()
    try:
        return tuple(MPI.Group.Translate_ranks(group, list(range(mpi_comm.Get_size())), world_group))
    finally:
        group.Free()
        world_group.Free()


def _displacements(counts):
    return np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)


def _decode_parts(data, counts):
    bounds = np.concatenate([[0], np.cumsum(counts)])
    return [_decode(data[a:b].tobytes()) for a, b in zip(bounds[:-1], bounds[1:])]


_TUPLE = 1    # the one msgpack extension type: a tuple, so that tuples and lists come back as they went


def _encode(obj):
    return msgpack.packb(obj, default=_plain, use_bin_type=True, strict_types=True)


def _plain(value):
    """Tuples as the tuple extension, NumPy scalars as Python numbers; anything else that is not plain data
    is refused by name."""
    if isinstance(value, tuple):
        return msgpack.ExtType(_TUPLE, _encode(list(value)))
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"comm: {type(value).__name__} is not plain data (None, bool, numbers, str, bytes, lists, "
                    "tuples, dicts); only plain data travels between ranks")


def _tuple_only(code, data):
    if code != _TUPLE:
        raise ValueError(f"comm: a message holds msgpack extension type {code}; only {_TUPLE} (a tuple) is known")
    return tuple(_decode(data))


def _decode(data):
    return msgpack.unpackb(data, raw=False, strict_map_key=False, ext_hook=_tuple_only)


def _synchronize_device(array):
    """Wait for the kernels that produce `array` before MPI reads GPU memory (CUDA-aware MPI)."""
    import cupy

    cupy.cuda.get_current_stream().synchronize()


def _array_module(array):
    import cupy

    return cupy


def _op(name):
    MPI = _mpi()
    ops = {"sum": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN, "prod": MPI.PROD}
    if name not in ops:
        raise ValueError(f"unknown reduction {name!r}; expected one of {sorted(ops)}")
    return ops[name]


def any_rank(comm, flag):
    """True on every rank of `comm` when `flag` is true on some rank (one 4-byte Allreduce, max): e.g. a stop
    request that only one rank received, so that all of them stop after the same step."""
    buf = np.array([1 if flag else 0], dtype=np.int32)
    comm.Allreduce(buf, op="max", what="stop agreement")
    return bool(buf[0])


@contextlib.contextmanager
def abort_on_error(comm=None, passthrough=()):
    """Run a rank's main inside this: an exception (or a non-zero SystemExit) on any rank ends the whole job.

    Without it, a rank that fails leaves the others waiting forever in their next collective (mpi4py
    finalises MPI at exit and mpiexec waits for the survivors). The traceback is printed with the rank
    first, then MPI_Abort(1) (or the SystemExit code) kills every process of the job. In a one-process
    world the exception simply propagates, as do `passthrough` exception types: endings every rank reaches
    together (a requested stop), which the caller handles.
    """
    comm = comm if comm is not None else world()
    try:
        yield comm
    except passthrough:
        raise
    except SystemExit as exc:
        code = exc.code
        if code in (None, 0) or comm.size == 1:
            raise
        print(f"[rank {comm.rank}] exiting with status {code}: aborting the job", file=sys.stderr)
        comm.Abort(code if isinstance(code, int) else 1)
    except BaseException:
        if comm.size == 1:
            raise
        print(f"[rank {comm.rank} of {comm.size}] failed; aborting the job:", file=sys.stderr)
        traceback.print_exc()
        comm.Abort(1)
