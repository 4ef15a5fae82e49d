"""Gradient buckets: flat buffers reduced by non-blocking collectives that start while backward still runs.

    reducer = Reducer(named_params, comm, bucket_mb=25)   # registers one grad-ready callback per parameter
    loss.backward()      # buckets start their Iallreduce as they fill up; backward returns once all are done
                         # and every .grad is the mean over the ranks

Layout (as PyTorch DDP): parameters in reverse registration order (the last layers' gradients are ready
first), cut into buckets of at most `bucket_mb` MiB of one dtype and device. Bucket k's parameters lie one
after the other in a flat space of `numel` elements, which is also cut into one equal slice per rank
(`shard_numel` elements each, the last one padded; `Bucket.spans`): the partition of sharded optimizer state.

During backward each parameter's post-accumulate-grad hook copies its gradient into the bucket, divided by
the number of ranks on the way (so the reduction's sum is already the mean and no pass over the buckets
follows the communication; exact for a power-of-two number of ranks), with one count per parameter (1 where
this rank produced a gradient), so the same collective also tells every rank which parameters got a
gradient anywhere. A full bucket starts its collective, but only in bucket order: bucket k never starts
before buckets 0..k-1, so every rank issues the same collectives in the same order whatever order its hooks
fire in. Two collectives:
- "allreduce": the bucket is [gradients | counts]; afterwards each parameter's .grad is a view of its slot.
- "reduce_scatter" (sharded optimizer state, stage 2): the bucket is one row per rank, [slice r of the
  gradients | all counts]; each rank receives its row summed over the ranks, i.e. the averaged gradient of
  its slice only (`Bucket.shard_grad`), and a parameter's full .grad is dropped as soon as it is packed.
  The rows are dropped as soon as their collective completes, and at most MAX_ROWS_IN_FLIGHT buckets'
  collectives are in flight (starting one more first waits for the oldest; with overlap=False each is waited
  for when it starts), so a rank holds the full-size rows of a few buckets at a time, not the whole gradient:
  those in flight and the one filling (more only where gradients arrive out of bucket order). The memory
  meter counts the rows and the received slices (disttrain.tensor.memory.count).

When the gradients are averaged (`sync`):
- "backward" (the default, as torch DDP): the first gradient of a backward pass queues an end-of-backward
  callback (disttrain.autograd.queue_callback) that starts the buckets that did not fill and waits for
  all of them, so backward() returns with averaged gradients.
- "deferred": backward returns with buckets still in flight; `synchronize()` finishes them.
Either way `synchronize()` finishes what is pending, and is a no-op once the gradients are averaged. A
parameter that got no gradient in this pass contributes the .grad it holds from an earlier no_sync pass, or
zeros; one that no rank produced a gradient for keeps .grad = None, exactly as in a one-process run.

NOTE (summation order): the layout is a pure function of the parameter list, bucket_mb and the number of
ranks, which DataParallel verifies to be equal on all ranks, and buckets start in a fixed order; so every
step issues the same collectives with the same counts in the same order, and MPI (whose algorithm choice
depends only on those, for a given library and number of ranks) sums in the same order every run: runs are
repeatable bit for bit (tests/mpi checks it), and every rank receives the same sums, so the replicas stay
identical.

NOTE (gradients are views): after an allreduce, `param.grad` is a view of the bucket. The next backward
replaces it (the engine accumulates out of place), so the only caveat is that a gradient array kept across
a later backward is overwritten, as with DDP's gradient_as_bucket_view.

NOTE (progress): MPICH moves a non-blocking collective forward only inside MPI calls (measured on this
machine, see docs/RUNNING_MPI.md). The reducer therefore tests its requests at every grad-ready callback
and, with progress="thread", from a thread that polls every `poll_interval` seconds while a bucket is in
flight, which keeps communication moving through long stretches of backward with no callback (an LSTM's
time steps).
"""
import contextlib

from disttrain.autograd.engine import queue_callback
from disttrain.autograd.grad_mode import no_grad
from disttrain import trace
from disttrain.parallel.overlap_choice import OverlapChoice
from disttrain.parallel.request_poller import RequestPoller
from disttrain.tensor import memory
from disttrain.tensor.tensor import Tensor

__all__ = ["Reducer", "Bucket", "bucket_layout", "OVERLAP_MODES", "SYNC_MODES", "COLLECTIVES", "MAX_ROWS_IN_FLIGHT"]

OVERLAP_MODES = (True, False, "auto")
SYNC_MODES = ("backward", "deferred")
COLLECTIVES = ("allreduce", "reduce_scatter")

MiB = 1 << 20
MAX_ROWS_IN_FLIGHT = 2    # reduce-scatter buckets whose collectives run at once (their rows stay alive until done)


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


class Bucket:
    """The parameters of one bucket and their place in its flat space and in the ranks' slices of it.

    params, names: in bucket order; offsets[i]: where parameter i starts in the flat space of `numel`
    elements; shard_numel: the size of each of the `ranks` slices (rank r's slice is [r*S, (r+1)*S));
    spans[i]: [(rank, lo, hi, pos)]: elements lo..hi of parameter i (flattened) lie in rank's slice from
    position pos. A subclass holds the buffers of one collective.
    """

    collective = None
    completes_early = False     # taken as soon as its collective completes (frees its send buffer), not at the sync

    def __init__(self, index, named, ranks):
        self.index = index
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.offsets, offset = [], 0
        for p in self.params:
            self.offsets.append(offset)
            offset += p.numel()
        self.numel = offset
        self.ranks = ranks
        self.shard_numel = -(-offset // ranks)
        self.spans = [_spans(o, p.numel(), self.shard_numel) for o, p in zip(self.offsets, self.params)]
        first = self.params[0]
        self.xp = first.backend.xp
        self.dtype = first.dtype
        self.scale = 1.0 / ranks
        self.arrived = set()
        self.handle = None
        self.launched = False
        self.completed = False      # its collective's result was taken in this synchronisation

    def spans_of(self, rank):
        """[(i, lo, hi, pos)]: the parts of parameters in `rank`'s slice, in order."""
        return [(i, lo, hi, pos) for i, spans in enumerate(self.spans) for r, lo, hi, pos in spans if r == rank]

    @property
    def nbytes(self):
        return self.numel * self.params[0].data.itemsize

    def _scaled(self, grad, out):
        """out = grad / ranks (a copy on one rank: exact)."""
        if self.ranks == 1:
            out[...] = grad
        else:
            self.xp.multiply(grad, self.scale, out=out)


def _spans(offset, size, shard):
    """The pieces of the flat range [offset, offset + size) cut at multiples of `shard`."""
    spans, lo = [], 0
    while lo < size:
        rank, pos = divmod(offset + lo, shard)
        hi = min(size, lo + shard - pos)
        spans.append((rank, lo, hi, pos))
        lo = hi
    return spans


class _AllreduceBucket(Bucket):
    """[gradients | one count per parameter], allreduced; afterwards .grad = a view of the parameter's slot."""

    collective = "allreduce"

    def __init__(self, index, named, ranks):
        super().__init__(index, named, ranks)
        self.flat = self.xp.zeros(self.numel + len(self.params), dtype=self.dtype)

    def slot(self, i):
        return self.flat[self.offsets[i]:self.offsets[i] + self.params[i].numel()]

    def pack(self, i, param):
        self._scaled(param.grad.data.reshape(-1), self.slot(i))
        self.flat[self.numel + i] = 1

    def pack_missing(self, i, param):
        if param.grad is None:
            self.slot(i)[...] = 0
            self.flat[self.numel + i] = 0
        else:
            self.pack(i, param)

    def start(self, comm):
        return comm.Iallreduce(self.flat, what=f"allreduce of gradient bucket {self.index}")

    def finish(self):
        counts = _host(self.flat[self.numel:])
        for i, p in enumerate(self.params):
            p.grad = Tensor(self.slot(i).reshape(p.shape)) if counts[i] > 0 else None


class _ReduceScatterBucket(Bucket):
    """One row per rank, [its slice of the gradients | every count], reduce-scattered: this rank receives its
    row summed over the ranks. Parameters' full gradients are dropped once packed; the rows live only from
    the first gradient of a pass until the collective completes."""

    collective = "reduce_scatter"
    completes_early = True

    def __init__(self, index, named, ranks):
        super().__init__(index, named, ranks)
        self.rows = None
        self.received = None
        self.shard_grad = None      # this rank's slice of the averaged gradients (shard_numel elements)
        self.shard_counts = None    # per parameter: how many ranks produced a gradient (host array)

    def _allocate(self):
        S, C = self.shard_numel, len(self.params)
        rows = self.xp.empty((self.ranks, S + C), dtype=self.dtype)
        rows[:, S:] = 0
        for r in range(self.ranks):               # padding past the last parameter: never read, sent as zeros
            rows[r, max(0, min(S, self.numel - r * S)):S] = 0
        memory.count(rows)
        self.rows = rows

    def pack(self, i, param):
        if self.rows is None:
            self._allocate()
        grad = param.grad.data.reshape(-1)
        for r, lo, hi, pos in self.spans[i]:
            self._scaled(grad[lo:hi], self.rows[r, pos:pos + hi - lo])
        self.rows[:, self.shard_numel + i] = 1
        param.grad = None

    def pack_missing(self, i, param):
        if param.grad is not None:
            self.pack(i, param)
            return
        if self.rows is None:
            self._allocate()
        for r, lo, hi, pos in self.spans[i]:
            self.rows[r, pos:pos + hi - lo] = 0

    def start(self, comm):
        self.received = self.xp.empty(self.shard_numel + len(self.params), dtype=self.dtype)
        memory.count(self.received)
        return comm.Ireduce_scatter_block(self.rows, self.received,
                                          what=f"reduce-scatter of gradient bucket {self.index}")

    def finish(self):
        """Add this pass's averaged slice to the one kept since the last zero_shard_grad (or take it)."""
        grad, counts = self.received[:self.shard_numel], _host(self.received[self.shard_numel:])
        if self.shard_grad is None:
            self.shard_grad, self.shard_counts = grad, counts
        else:
            self.shard_grad += grad
            self.shard_counts = self.shard_counts + counts
        self.rows = self.received = None

    def zero_shard_grad(self, set_to_none=True):
        """Forget the averaged slice (as zero_grad does .grad): drop it, or keep it as zeros."""
        if set_to_none or self.shard_grad is None:
            self.shard_grad = self.shard_counts = None
        else:
            self.shard_grad[...] = 0


def _host(array):
    """A small array on the host (one device sync on CuPy, not one per element)."""
    return array.get() if hasattr(array, "get") else array


class Reducer:
    """Averages the gradients of `named_params` ([(name, Parameter)], the same on every rank) over `comm`.

    progress: "thread" (test requests from the grad-ready callbacks and from a polling thread) or "hooks"
    (from the callbacks only). The thread is used only when the MPI grants at least MPI_THREAD_SERIALIZED.
    overlap=False: the callbacks only pack; the buckets are reduced one after another once backward is done.
    That is faster where communication needs the same cores as backward (shared-memory MPI on a small
    machine: measured in benchmarks/bench_allreduce_overlap.py), slower where a network adapter moves the data.
    overlap="auto": time the first steps both ways and keep the faster (disttrain.parallel.overlap_choice).
    sync: "backward" (averaged when backward returns) or "deferred" (by synchronize()); collective:
    "allreduce" or "reduce_scatter" (see the module docstring).
    """

    def __init__(self, named_params, comm, bucket_mb=25.0, progress="thread", poll_interval=1e-4, overlap=True,
                 sync="backward", collective="allreduce"):
        for name, value, allowed in (("progress", progress, ("thread", "hooks")), ("overlap", overlap, OVERLAP_MODES),
                                     ("sync", sync, SYNC_MODES), ("collective", collective, COLLECTIVES)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")
        self.comm = comm
        self.named_params = [(n, p) for n, p in named_params if p.requires_grad]
        self.bucket_mb = bucket_mb
        self.sync = sync
        self.collective = collective
        layout = bucket_layout(self.named_params, bucket_mb)
        self.buckets = [self._bucket(k, [self.named_params[i] for i in idx]) for k, idx in enumerate(layout)]
        self.syncs = 0                 # completed synchronisations (the gradients of one or more passes each)
        self._next = 0                 # the next bucket to start (buckets start in index order)
        self._active = False           # some gradient arrived or some bucket started since the last sync
        self._synced = False           # the gradients are averaged and no backward has changed them since
        self._queued = False           # this pass has queued its end-of-backward synchronisation
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
        self._poller = RequestPoller(poll_interval) if use_thread else None

    def _bucket(self, index, named):
        if self.collective == "reduce_scatter":
            return _ReduceScatterBucket(index, named, self.comm.size)
        return _AllreduceBucket(index, named, self.comm.size)

    def resident_buffers(self):
        """The allreduce buckets' flat buffers: alive from step to step, held by no tensor between a pass's
        first packed gradient and the unpacking (a reduce-scatter's rows come and go within a pass)."""
        return [b.flat for b in self.buckets if isinstance(b, _AllreduceBucket)]

    # ---- during backward -----------------------------------------------------------------------
    def _callback(self, bucket, i):
        def grad_ready(param):
            if self._enabled:
                self._grad_ready(bucket, i, param)
            else:
                self._synced = False     # a no_sync pass changed .grad: the next sync must reduce it
        return grad_ready

    def _grad_ready(self, bucket, i, param):
        if i in bucket.arrived or bucket.launched:
            raise RuntimeError(
                f"the gradient of '{bucket.names[i]}' became ready twice before its gradients were averaged: "
                "with sync=\"deferred\", backward ran again before synchronize(). Call synchronize() after "
                "every backward, or run the extra backward passes inside no_sync() to accumulate gradients "
                "locally.")
        if param.grad.dtype != bucket.dtype:
            raise RuntimeError(f"the gradient of '{bucket.names[i]}' is {param.grad.dtype}, its bucket "
                               f"{bucket.dtype}: build DataParallel after moving or casting the model")
        bucket.pack(i, param)
        bucket.arrived.add(i)
        self._active = True
        self._synced = False
        if self.sync == "backward" and not self._queued:
            queue_callback(self.synchronize)
            self._queued = True
        if self.overlap:
            if len(bucket.arrived) == len(bucket.params):
                self._start_ready()
            self._test()
        elif bucket.completes_early and len(bucket.arrived) == len(bucket.params):
            self._start_ready()     # and wait: only the filling bucket's rows stay alive
            for started in self.buckets[:self._next]:
                if not started.completed:
                    self._complete(started)

    def _start_ready(self):
        """Start every full bucket whose predecessors have all started."""
        buckets = self.buckets
        while self._next < len(buckets) and len(buckets[self._next].arrived) == len(buckets[self._next].params):
            self._start(buckets[self._next])

    def _start(self, bucket):
        if bucket.completes_early:
            in_flight = [b for b in self.buckets[:self._next] if not b.completed]
            for earlier in in_flight[:max(0, len(in_flight) - MAX_ROWS_IN_FLIGHT + 1)]:
                self._complete(earlier)
        bucket.handle = bucket.start(self.comm)
        bucket.launched = True
        self._next += 1
        self.drive(bucket.handle)

    def _complete(self, bucket):
        """Wait for `bucket`'s collective and take its result (once per synchronisation)."""
        bucket.handle.wait()
        trace.record(f"{bucket.collective} bucket {bucket.index}", bucket.handle.started_at,
                     bucket.handle.completed_at, lane="comm", bytes=bucket.nbytes, params=len(bucket.params))
        with no_grad():
            bucket.finish()
        bucket.completed = True

    def drive(self, handle):
        """Let the progress thread, if there is one, test `handle` until it completes (MPI moves a
        non-blocking operation forward only inside MPI calls)."""
        if self._poller is not None:
            self._poller.watch(handle)

    def _test(self):
        """Drive MPI progress: test the requests in flight (cheap when there are none)."""
        for bucket in self.buckets[:self._next]:
            if not bucket.handle.test():
                break        # later buckets were started later; one test per callback is enough
            if bucket.completes_early and not bucket.completed:
                self._complete(bucket)

    # ---- after backward ------------------------------------------------------------------------
    def pending(self):
        """True from the first gradient of a backward pass until its gradients are averaged."""
        return self._active

    def check_synchronized(self, call):
        """Raise RuntimeError naming `call` (e.g. "zero_grad()") while gradient reductions are pending."""
        if self._active:
            raise RuntimeError(
                f"{call} called while gradient reductions are still pending: the gradients of the last backward "
                "are being averaged across ranks. With sync=\"deferred\", call the data-parallel model's "
                "synchronize() after backward and before the optimizer's step() or zero_grad().")

    def synchronize(self):
        """Start what has not started, wait for every bucket, average; the gradients are then the global mean.

        A collective: every rank calls it (or its end-of-backward callback does) once per optimizer step. A
        no-op inside no_sync() and when the gradients are averaged already.
        """
        if not self._enabled or self._synced:
            return
        with trace.span("sync gradients"):
            for bucket in self.buckets[self._next:]:
                for i, p in enumerate(bucket.params):
                    if i not in bucket.arrived:
                        bucket.pack_missing(i, p)
                # NOTE: one at a time: MPICH runs several collectives in flight together slower on shared
                # memory than in turn (benchmarks/RESULTS.md), and these buckets are all ready now anyway
                if self._next:
                    self.buckets[self._next - 1].handle.wait()
                self._start(bucket)
            for bucket in self.buckets:
                if not bucket.completed:
                    self._complete(bucket)
                bucket.arrived.clear()
                bucket.launched = bucket.completed = False
        self._next = 0
        self._active = self._queued = False
        self._synced = True
        self.syncs += 1
        if self.choice is not None:
            self._next_mode()

    def _next_mode(self):
        """overlap="auto": the trial steps' mode, then the chosen one (the progress thread goes if unused)."""
        self.overlap = self.choice.next_mode(self.overlap)
        if self.choice.chosen is False and self._poller is not None:
            self._poller.stop()
            self._poller = None

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
