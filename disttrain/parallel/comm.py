"""Communicator: the few MPI calls disttrain uses, over mpi4py, on NumPy and CuPy buffers.

    comm = world()                       # MPI_COMM_WORLD (MPI starts on the first call, not at import)
    comm.Allreduce(grads)                # in place, buffer-based
    handle = comm.Iallreduce(bucket)     # non-blocking; handle.test() / handle.wait()
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
"""
import contextlib
import os
import sys
import threading
import time
import traceback

import numpy as np

from disttrain import trace
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
    """The communicator of all processes of the job (MPI_COMM_WORLD), created once."""
    global _world
    if _world is None:
        _world = Communicator(_mpi().COMM_WORLD)
    return _world


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

    __slots__ = ("_request", "_finish", "done", "started_at", "completed_at")

    def __init__(self, request, finish=None):
        self._request = request
        self._finish = finish
        self.done = False
        self.started_at = trace.now()
        self.completed_at = None

    def test(self):
        if not self.done:
            with _LOCK:
                if not self.done and self._request.Test():
                    self._mark_done()
        return self.done

    def wait(self):
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
    """A wrapper of one mpi4py communicator: rank, size, buffer collectives, sub-communicators, Abort."""

    def __init__(self, mpi_comm, cuda_aware=None):
        self._comm = mpi_comm
        self.rank = mpi_comm.Get_rank()
        self.size = mpi_comm.Get_size()
        self.cuda_aware = cuda_aware_default() if cuda_aware is None else bool(cuda_aware)
        self._staging = HostStaging()

    @property
    def mpi_comm(self):
        """The underlying mpi4py communicator (for calls this class does not wrap)."""
        return self._comm

    def __repr__(self):
        return f"<Communicator rank {self.rank} of {self.size}>"

    # ---- sub-communicators -----------------------------------------------------------------
    def Split(self, color, key=None):
        """Ranks passing the same color form a new communicator, ordered by key (default: this rank)."""
        with _LOCK:
            sub = self._comm.Split(int(color), self.rank if key is None else int(key))
        return Communicator(sub, self.cuda_aware)

    def Dup(self):
        """A communicator over the same ranks whose messages never match this one's."""
        with _LOCK:
            return Communicator(self._comm.Dup(), self.cuda_aware)

    def thread_level(self):
        """The MPI thread support level granted (compare with MPI.THREAD_SERIALIZED / THREAD_MULTIPLE)."""
        return _mpi().Query_thread()

    def supports_threads(self):
        """Whether a second thread may make MPI calls (serialised by this module's lock)."""
        MPI = _mpi()
        return MPI.Query_thread() >= MPI.THREAD_SERIALIZED

    # ---- buffer collectives (hot paths) ------------------------------------------------------
    def Barrier(self):
        with _LOCK:
            self._comm.Barrier()

    def Allreduce(self, buf, op="sum"):
        """Reduce `buf` over all ranks, in place; returns buf."""
        mpi_op = _op(op)
        if self.size == 1:
            return buf
        target, finish = self._prepare(buf)
        with _LOCK:
            self._comm.Allreduce(_mpi().IN_PLACE, target, op=mpi_op)
        finish()
        return buf

    def Iallreduce(self, buf, op="sum"):
        """Start reducing `buf` in place over all ranks; returns a Handle. `buf` must not be touched until
        the handle completes."""
        mpi_op = _op(op)
        target, finish = self._prepare(buf)
        with _LOCK:
            request = self._comm.Iallreduce(_mpi().IN_PLACE, target, op=mpi_op)
        return Handle(request, finish)

    def Bcast(self, buf, root=0):
        """Overwrite `buf` on every rank with root's; returns buf."""
        if self.size == 1:
            return buf
        target, finish = self._prepare(buf, copy_in=self.rank == root, copy_out=self.rank != root)
        with _LOCK:
            self._comm.Bcast(target, root=root)
        finish()
        return buf

    def Allgather(self, sendbuf, recvbuf=None):
        """Every rank's `sendbuf` side by side: recvbuf has shape (size, *sendbuf.shape); returns recvbuf."""
        if recvbuf is None:
            xp = np if not is_device_array(sendbuf) else _array_module(sendbuf)
            recvbuf = xp.empty((self.size,) + tuple(sendbuf.shape), dtype=sendbuf.dtype)
        send, sent = self._prepare(sendbuf, copy_out=False)
        target, finish = self._prepare(recvbuf, copy_in=False)
        with _LOCK:
            self._comm.Allgather(send, target)
        sent()
        finish()
        return recvbuf

    # ---- point-to-point (pipeline stages) -------------------------------------------------------
    def Send(self, buf, dest, tag=0):
        """Send `buf` to rank `dest` (blocking until the buffer may be reused)."""
        send, sent = self._prepare(buf, copy_out=False)
        with _LOCK:
            self._comm.Send(send, dest=int(dest), tag=int(tag))
        sent()

    def Recv(self, buf, source, tag=0):
        """Receive into `buf` (its shape and dtype must match the message) from rank `source`; returns buf."""
        target, finish = self._prepare(buf, copy_in=False)
        with _LOCK:
            self._comm.Recv(target, source=int(source), tag=int(tag))
        finish()
        return buf

    def Isend(self, buf, dest, tag=0):
        """Start sending `buf` to rank `dest`; returns a Handle. `buf` must not change until it completes."""
        send, sent = self._prepare(buf, copy_out=False)
        with _LOCK:
            request = self._comm.Isend(send, dest=int(dest), tag=int(tag))
        return Handle(request, sent)

    def Irecv(self, buf, source, tag=0):
        """Start receiving into `buf` from rank `source`; returns a Handle (buf holds the message after
        wait(); a device array is filled from its host staging buffer then)."""
        target, finish = self._prepare(buf, copy_in=False)
        with _LOCK:
            request = self._comm.Irecv(target, source=int(source), tag=int(tag))
        return Handle(request, finish)

    # ---- pickled objects (setup, error reports, end of run: never on hot paths) --------------
    def allgather_object(self, obj):
        with _LOCK:
            return self._comm.allgather(obj)

    def gather_object(self, obj, root=0):
        with _LOCK:
            return self._comm.gather(obj, root=root)

    def bcast_object(self, obj, root=0):
        with _LOCK:
            return self._comm.bcast(obj, root=root)

    # ---- ending the job ------------------------------------------------------------------------
    def Abort(self, code=1):
        """End every process of the job now (MPI_Abort): what a failing rank must do instead of exiting
        while the others wait in a collective for it."""
        sys.stdout.flush()
        sys.stderr.flush()
        time.sleep(0.5)     # let the launcher forward this rank's last output: the abort kills its pipes
        self._comm.Abort(int(code))

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
    comm.Allreduce(buf, op="max")
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
