"""Gradient buckets: flat buffers reduced by non-blocking allreduces that start while backward still runs.

    reducer = Reducer(named_params, comm, bucket_mb=25)   # registers one grad-ready callback per parameter
    loss.backward()                                       # buckets start their Iallreduce as they fill up
    reducer.synchronize()                                 # wait for all of them; .grad = mean over ranks

Layout (as PyTorch DDP): parameters in reverse registration order (the last layers' gradients are ready
first), cut into buckets of at most `bucket_mb` MiB of one dtype and device. Bucket k's flat buffer holds its
parameters' gradients one after the other, then one count per parameter (1 where this rank produced a
gradient), so a single allreduce also tells every rank which parameters got a gradient anywhere.

During backward each parameter's post-accumulate-grad hook copies its gradient into its slot, divided by the
number of ranks on the way (so the allreduce's sum is already the mean and no pass over the buckets follows
the communication; exact for a power-of-two number of ranks). A full bucket starts its Iallreduce, but only
in bucket order: bucket k never starts before buckets 0..k-1, so every rank issues the same collectives in
the same order whatever order its hooks fire in.

`synchronize()` starts the buckets that did not fill (a parameter that got no gradient in this pass
contributes the .grad it holds from an earlier no_sync pass, or zeros), waits for every bucket in order and
points each parameter's .grad at its slot. A parameter that no rank produced a gradient for keeps
.grad = None, exactly as in a one-process run.

NOTE (summation order): the layout is a pure function of the parameter list and bucket_mb, which
DataParallel verifies to be equal on all ranks, and buckets start in a fixed order; so every step issues the
same allreduces with the same counts in the same order, and MPI (whose algorithm choice depends only on
those, for a given library and number of ranks) sums in the same order every run: runs are repeatable bit
for bit (tests/mpi checks it), and every rank receives the same sums, so the replicas stay identical.

NOTE (gradients are views): after synchronize, `param.grad` is a view of the bucket. The next backward
replaces it (the engine accumulates out of place), so the only caveat is that a gradient array kept across
a later backward is overwritten, as with DDP's gradient_as_bucket_view.

NOTE (progress): MPICH moves a non-blocking collective forward only inside MPI calls (measured on this
machine, see docs/RUNNING_MPI.md). The reducer therefore tests its requests at every grad-ready callback
and, with progress="thread", from a thread that polls every `poll_interval` seconds while a bucket is in
flight, which keeps communication moving through long stretches of backward with no callback (an LSTM's
time steps).
"""
import contextlib
import threading
import time

from disttrain.autograd.grad_mode import no_grad
from disttrain import trace
from disttrain.parallel.overlap_choice import OverlapChoice
from disttrain.tensor.tensor import Tensor

__all__ = ["Reducer", "bucket_layout", "OVERLAP_MODES"]

OVERLAP_MODES = (True, False, "auto")

MiB = 1 << 20


def bucket_layout(named_params, bucket_mb):
    """Buckets as lists of indices into named_params: reverse order, one dtype and device per bucket,
    at most bucket_mb MiB each (a larger parameter gets a bucket of its own)."""
    cap = float(bucket_mb) * MiB
    buckets, current, size, key = [], [], 0, None
    for i in reversed(range(len(named_params))):
        p = named_params[i][1]
        k = (p.dtype, p.device)
        nbytes = p.data.nbytes
        if current and (k != key or size + nbytes > cap):
            buckets.append(current)
            current, size = [], 0
        current.append(i)
        size += nbytes
        key = k
    if current:
        buckets.append(current)
    return buckets


class _Bucket:
    __slots__ = ("index", "params", "names", "offsets", "numel", "xp", "flat", "arrived", "handle", "launched")

    def __init__(self, index, named):
        self.index = index
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.offsets, offset = [], 0
        for p in self.params:
            self.offsets.append(offset)
            offset += p.numel()
        self.numel = offset
        first = self.params[0]
        self.xp = first.backend.xp
        # gradients, then one "this rank has a gradient" count per parameter
        self.flat = self.xp.zeros(offset + len(self.params), dtype=first.dtype)
        self.arrived = set()
        self.handle = None
        self.launched = False

    def slot(self, i):
        p = self.params[i]
        return self.flat[self.offsets[i]:self.offsets[i] + p.numel()]

    @property
    def nbytes(self):
        return self.numel * self.flat.itemsize


class Reducer:
    """Averages the gradients of `named_params` ([(name, Parameter)], the same on every rank) over `comm`.

    progress: "thread" (test requests from the grad-ready callbacks and from a polling thread) or "hooks"
    (from the callbacks only). The thread is used only when the MPI grants at least MPI_THREAD_SERIALIZED.
    overlap=False: the callbacks only pack; synchronize() reduces the buckets one after another. That is
    faster where communication needs the same cores as backward (shared-memory MPI on a small machine:
    measured in benchmarks/bench_allreduce_overlap.py), slower where a network adapter moves the data.
    overlap="auto": time the first steps both ways and keep the faster (disttrain.parallel.overlap_choice).
    """

    def __init__(self, named_params, comm, bucket_mb=25.0, progress="thread", poll_interval=1e-4, overlap=True):
        if progress not in ("thread", "hooks"):
            raise ValueError(f'progress must be "thread" or "hooks", got {progress!r}')
        if overlap not in OVERLAP_MODES:
            raise ValueError(f'overlap must be true, false or "auto", got {overlap!r}')
        self.comm = comm
        self.named_params = [(n, p) for n, p in named_params if p.requires_grad]
        self.bucket_mb = bucket_mb
        layout = bucket_layout(self.named_params, bucket_mb)
        self.buckets = [_Bucket(k, [self.named_params[i] for i in idx]) for k, idx in enumerate(layout)]
        self._next = 0                 # the next bucket to start (buckets start in index order)
        self._active = False           # some gradient arrived or some bucket started since the last sync
        self._enabled = True           # False inside no_sync()
        auto = isinstance(overlap, str)
        self.choice = OverlapChoice(comm) if auto and comm.size > 1 else None
        self.overlap = auto or bool(overlap)  # the mode of the coming backward pass ("auto" starts overlapped)
        self._handles = []
        for bucket in self.buckets:
            for i, p in enumerate(bucket.params):
                self._handles.append(p.register_post_accumulate_grad_hook(self._callback(bucket, i)))
        use_thread = progress == "thread" and self.overlap and comm.size > 1 and comm.supports_threads()
        self.progress = "thread" if use_thread else "hooks"
        self._poller = _Poller(poll_interval) if use_thread else None

    # ---- during backward -----------------------------------------------------------------------
    def _callback(self, bucket, i):
        def grad_ready(param):
            if self._enabled:
                self._grad_ready(bucket, i, param)
        return grad_ready

    def _grad_ready(self, bucket, i, param):
        if i in bucket.arrived or bucket.launched:
            raise RuntimeError(
                f"the gradient of '{bucket.names[i]}' became ready twice before synchronize(): backward ran "
                "again before the gradients of the previous one were synchronised. Call synchronize() (or "
                "strategy.sync_gradients) after every backward, or run the extra backward passes inside "
                "no_sync() to accumulate gradients locally.")
        grad = param.grad.data
        if grad.dtype != bucket.flat.dtype:
            raise RuntimeError(f"the gradient of '{bucket.names[i]}' is {grad.dtype}, its bucket "
                               f"{bucket.flat.dtype}: build DataParallel after moving or casting the model")
        self._pack(bucket, i, grad)
        bucket.arrived.add(i)
        self._active = True
        if self.overlap:
            if len(bucket.arrived) == len(bucket.params):
                self._start_ready()
            self._test()

    def _start_ready(self):
        """Start every full bucket whose predecessors have all started."""
        buckets = self.buckets
        while self._next < len(buckets) and len(buckets[self._next].arrived) == len(buckets[self._next].params):
            self._start(buckets[self._next])

    def _start(self, bucket):
        bucket.handle = self.comm.Iallreduce(bucket.flat, what=f"allreduce of gradient bucket {bucket.index}")
        bucket.launched = True
        self._next += 1
        if self._poller is not None:
            self._poller.watch(bucket.handle)

    def _test(self):
        """Drive MPI progress: test the requests in flight (cheap when there are none)."""
        for bucket in self.buckets[:self._next]:
            if not bucket.handle.test():
                break        # later buckets were started later; one test per callback is enough

    # ---- after backward ------------------------------------------------------------------------
    def pending(self):
        """True from the first gradient of a backward pass until synchronize() has averaged them."""
        return self._active

    def synchronize(self):
        """Start what has not started, wait for every bucket, average; each .grad is then the global mean.

        A collective: every rank calls it once per optimizer step. Inside no_sync() it does nothing.
        """
        if not self._enabled:
            return
        with trace.span("sync gradients"):
            for bucket in self.buckets[self._next:]:
                self._fill_missing(bucket)
                # NOTE: one at a time: MPICH runs several Iallreduces in flight together about 1.5x slower on
                # shared memory than in turn (measured), and these buckets are all ready now anyway
                if self._next:
                    self.buckets[self._next - 1].handle.wait()
                self._start(bucket)
            with no_grad():
                for bucket in self.buckets:
                    bucket.handle.wait()
                    trace.record(f"allreduce bucket {bucket.index}", bucket.handle.started_at,
                                 bucket.handle.completed_at, lane="comm", bytes=bucket.nbytes,
                                 params=len(bucket.params))
                    self._unpack(bucket)
        self._next = 0
        self._active = False
        if self.choice is not None:
            self._next_mode()

    def _next_mode(self):
        """overlap="auto": the trial steps' mode, then the chosen one (the progress thread goes if unused)."""
        self.overlap = self.choice.next_mode(self.overlap)
        if self.choice.chosen is False and self._poller is not None:
            self._poller.stop()
            self._poller = None

    def _pack(self, bucket, i, grad):
        """Copy a gradient / number of ranks into its slot and count it."""
        slot = bucket.slot(i)
        if self.comm.size == 1:
            slot[...] = grad.reshape(-1)
        else:
            bucket.xp.multiply(grad.reshape(-1), 1.0 / self.comm.size, out=slot)
        bucket.flat[bucket.numel + i] = 1

    def _fill_missing(self, bucket):
        """Slots whose hook did not fire this pass: the .grad kept from a no_sync pass, or zeros."""
        for i, p in enumerate(bucket.params):
            if i in bucket.arrived:
                continue
            if p.grad is None:
                bucket.slot(i)[...] = 0
                bucket.flat[bucket.numel + i] = 0
            else:
                self._pack(bucket, i, p.grad.data)

    def _unpack(self, bucket):
        flat = bucket.flat
        counts = flat[bucket.numel:]
        # NOTE: one host read of the counts (a device sync on CuPy), not one per parameter
        counts = counts.get() if hasattr(counts, "get") else counts
        for i, p in enumerate(bucket.params):
            p.grad = Tensor(bucket.slot(i).reshape(p.shape)) if counts[i] > 0 else None
        bucket.arrived.clear()
        bucket.launched = False

    # ---- gradient accumulation -----------------------------------------------------------------
    @contextlib.contextmanager
    def no_sync(self):
        """Backward passes inside accumulate into .grad locally; the first one after it synchronises the sum."""
        if self._active:
            raise RuntimeError("no_sync() entered while gradients of an earlier backward are still being "
                               "synchronised; call synchronize() first")
        previous, self._enabled = self._enabled, False
        try:
            yield
        finally:
            self._enabled = previous

    def close(self):
        """Remove the grad-ready callbacks and stop the progress thread."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._poller is not None:
            self._poller.stop()
            self._poller = None


class _Poller:
    """A daemon thread that tests in-flight requests every `interval` seconds, idle when there are none."""

    def __init__(self, interval):
        self.interval = interval
        self._queue = []
        self._wake = threading.Event()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="disttrain-mpi-progress", daemon=True)
        self._thread.start()

    def watch(self, handle):
        self._queue.append(handle)
        self._wake.set()

    def stop(self):
        self._stopped = True
        self._wake.set()
        self._thread.join()

    def _run(self):
        queue = self._queue
        while not self._stopped:
            self._wake.wait()
            self._wake.clear()
            while queue and not self._stopped:
                # in start order: once the first is still running, so (almost surely) are the later ones
                while queue and queue[0].test():
                    queue.pop(0)
                if queue:
                    time.sleep(self.interval)
