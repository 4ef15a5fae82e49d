"""StageLink: a pipeline stage's two channels, activations to the next stage and gradients to the previous one.

    link = StageLink(pipe_comm, stage, stages)         # pipe_comm: one replica's K stages, rank = stage index
    link.begin_step(keys)        # keys[m]: what fixes micro-batch m's boundary shapes (e.g. its token shape)
    x = link.recv_activation(m)                        # stage > 0: the previous stage's output for m
    link.send_activation(m, keys[m], y)                # stage < K-1: also posts the receive of y's gradient
    g = link.recv_gradient(m)                          # stage < K-1: d loss / d y for micro-batch m
    link.send_gradient(m, x_grad)                      # stage > 0
    link.end_step()                                    # waits for this step's sends

Every message is a buffer (mpi4py's upper-case Isend/Irecv through the Communicator; device arrays are host
staged by it), tagged with its micro-batch index; activations and gradients travel in opposite directions, so
their (source, tag) pairs never collide, and MPI's non-overtaking order keeps steps apart.

Shapes and dtypes are agreed without serialised objects: every rank of the pipe sees the same `keys` (the
micro-batch's token shape and dtype, say), and the first time a stage sends an activation for a key it
sends a fixed-size int64 header (ndim, dtype code, dims) before it; the receiver, knowing the key is new
too, receives that header once and caches the shape for the key. A gradient has the shape of the activation
it belongs to, which its receiver sent itself. Receives are posted early, all of a step's activation
receives in begin_step and each gradient receive when its activation is sent, so messages land while the
stage computes.
"""
import os
import time

import numpy as np

from disttrain import trace
from disttrain.parallel.request_poller import RequestPoller
from disttrain.tensor import memory

__all__ = ["StageLink", "HEADER_TAG", "encode_header", "decode_header"]

HEADER_TAG = 32000              # MPI guarantees tags up to 32767; micro-batch tags stay below this
_MAX_DIMS = 8
_PROGRESS_INTERVAL = 1e-4
_DTYPES = ("float32", "float64", "float16", "bfloat16", "int64", "int32")


def encode_header(shape, dtype):
    """(ndim, dtype code, dims padded to 8) as an int64 array: what a receiver needs to allocate a buffer."""
    name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if name not in _DTYPES or len(shape) > _MAX_DIMS:
        raise ValueError(f"cannot send a pipeline activation of dtype {name} and shape {tuple(shape)}: expected "
                         f"one of {_DTYPES} with at most {_MAX_DIMS} dimensions")
    header = np.zeros(2 + _MAX_DIMS, dtype=np.int64)
    header[0], header[1] = len(shape), _DTYPES.index(name)
    header[2:2 + len(shape)] = shape
    return header


def decode_header(header):
    """(shape, dtype name) from encode_header's array."""
    ndim = int(header[0])
    return tuple(int(d) for d in header[2:2 + ndim]), _DTYPES[int(header[1])]


class StageLink:
    """Point-to-point channels of stage `stage` (0-based) of `stages`, over `comm` whose ranks are the stages.

    xp: the array module receive buffers are allocated with (numpy, or cupy for stages on a GPU).
    poll_interval: None waits inside MPI (MPICH spins on its core: the lowest latency when every rank has a
    core); seconds > 0 polls with sleeps in between instead, leaving the core to others when ranks share
    cores (oversubscribed machines). Default from DISTTRAIN_PIPE_POLL (seconds), else None.
    progress: "none" (default): MPI moves messages when this stage sends or waits; "thread" also tests the
    messages in flight every 100 us from a thread (as the data-parallel reducer does), so that a large
    activation sent before a long forward need not wait for that forward to end. Where ranks share cores its
    GIL hand-offs cost more than it saves (benchmarks/bench_pipeline.py, RESULTS.md); it may pay across
    machines or with spare cores.
    """

    def __init__(self, comm, stage, stages, xp=np, poll_interval=None, progress="none"):
        if comm.size != stages or comm.rank != stage:
            raise ValueError(f"StageLink: the pipe communicator must hold exactly the {stages} stages with rank = "
                             f"stage index; got rank {comm.rank} of {comm.size} for stage {stage}")
        self.comm, self.stage, self.stages, self.xp = comm, stage, stages, xp
        self.prev = stage - 1 if stage > 0 else None
        self.next = stage + 1 if stage < stages - 1 else None
        self._shapes_in = {}          # key -> (shape, dtype) of activations from the previous stage
        self._keys_out = set()        # keys whose header went to the next stage
        self._act_in = {}             # m -> (handle, buffer)
        self._grad_in = {}            # m -> (handle, buffer)
        self._sends = []              # (handle, buffer kept alive until sent)
        if poll_interval is None and os.environ.get("DISTTRAIN_PIPE_POLL"):
            poll_interval = float(os.environ["DISTTRAIN_PIPE_POLL"])
        self.poll_interval = poll_interval
        use_thread = progress == "thread" and stages > 1 and comm.supports_threads()
        self._poller = RequestPoller(_PROGRESS_INTERVAL) if use_thread else None

    # ---- step boundaries -------------------------------------------------------------------------
    def begin_step(self, keys):
        """Post the receives of this step's activations (one per micro-batch; keys[m] fixes m's shapes)."""
        if self.prev is None:
            return
        for m, key in enumerate(keys):
            if key not in self._shapes_in:
                header = np.empty(2 + _MAX_DIMS, dtype=np.int64)
                with trace.span("recv header", lane="comm", peer=self.prev):
                    self.comm.Recv(header, source=self.prev, tag=HEADER_TAG,
                                   what=f"stage {self.stage} receive of an activation header")
                self._shapes_in[key] = decode_header(header)
            shape, dtype = self._shapes_in[key]
            self._act_in[m] = self._post_receive(shape, dtype, self.prev, m, "activation")

    def end_step(self):
        """Wait for this step's sends (their buffers may be reused or freed afterwards)."""
        with trace.span("wait sends", lane="comm"):
            for handle, _ in self._sends:
                self._complete(handle)
        self._sends.clear()
        if self._act_in or self._grad_in:
            raise RuntimeError(f"pipeline stage {self.stage}: step ended with unconsumed messages "
                               f"(activations {sorted(self._act_in)}, gradients {sorted(self._grad_in)})")

    # ---- forward direction -----------------------------------------------------------------------
    def recv_activation(self, m):
        """The previous stage's output for micro-batch m (waits for it)."""
        return self._wait(self._act_in, m, "recv activation", self.prev)

    def send_activation(self, m, key, array, expect_gradient=True):
        """Send micro-batch m's output to the next stage and (expect_gradient) post the receive of its gradient."""
        array = self.xp.ascontiguousarray(array)
        if key not in self._keys_out:
            self._isend(encode_header(array.shape, array.dtype), self.next, HEADER_TAG, "activation header")
            self._keys_out.add(key)
        with trace.span("send activation", lane="comm", micro_batch=m, peer=self.next):
            self._isend(array, self.next, m, "activation")
        if expect_gradient:
            self._grad_in[m] = self._post_receive(array.shape, array.dtype, self.next, m, "gradient")

    # ---- backward direction ----------------------------------------------------------------------
    def recv_gradient(self, m):
        """d loss / d (this stage's output) for micro-batch m, from the next stage (waits for it)."""
        return self._wait(self._grad_in, m, "recv gradient", self.next)

    def send_gradient(self, m, array):
        """Send d loss / d (this stage's input) for micro-batch m to the previous stage."""
        with trace.span("send gradient", lane="comm", micro_batch=m, peer=self.prev):
            self._isend(self.xp.ascontiguousarray(array), self.prev, m, "gradient")

    # ---- internals -------------------------------------------------------------------------------
    def close(self):
        """Stop the progress thread (the link cannot be used afterwards)."""
        if self._poller is not None:
            self._poller.stop()
            self._poller = None

    def _watched(self, handle):
        if self._poller is not None:
            self._poller.watch(handle)
        return handle

    def _post_receive(self, shape, dtype, source, tag, kind):
        buffer = self.xp.empty(shape, dtype=dtype)
        memory.count(buffer)
        what = f"stage {self.stage} receive of micro-batch {tag}'s {kind} from stage {source}"
        return self._watched(self.comm.Irecv(buffer, source=source, tag=tag, what=what)), buffer

    def _wait(self, pending, m, what, peer):
        handle, buffer = pending.pop(m)
        with trace.span(what, lane="comm", micro_batch=m, peer=peer):
            self._complete(handle)
        return buffer

    def _complete(self, handle):
        if self.poll_interval and handle.watchdog is None:
            while not handle.test():
                time.sleep(self.poll_interval)
        handle.wait(self.poll_interval)

    def _isend(self, array, dest, tag, kind):
        what = f"stage {self.stage} send of {kind}" + (f" of micro-batch {tag}" if tag != HEADER_TAG else "") + \
            f" to stage {dest}"
        self._sends.append((self._watched(self.comm.Isend(array, dest=dest, tag=tag, what=what)), array))
