"""DataParallel: one model replicated on every rank, each rank on its share of the batch, gradients averaged.

    import disttrain.parallel as par
    model = par.DataParallel(model, bucket_mb=25, optimizer=opt)   # broadcast rank 0's weights, check shapes
    for x, y in my_shard_of_the_data:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()              # bucket allreduces start while backward runs
        model.synchronize()          # wait for them: every .grad is now the mean over the ranks
        opt.step()

With the loss a mean over each rank's B/N examples, the averaged gradient is the gradient of the mean over
all B examples, so N ranks with B/N each take the same steps as one process with B (up to float rounding
of sums taken in another order). Gradient accumulation: run the first k-1 backward passes inside
`with model.no_sync():`; the k-th synchronises the accumulated sum.

At construction every rank compares a digest of its parameters' names, shapes and dtypes (and bucket_mb)
with the others'; on any difference all ranks raise ModelMismatchError with the same message naming the
differences, instead of deadlocking later in mismatched allreduces. Then rank 0's parameters and persistent
buffers are broadcast, so every replica starts from the same weights.

The wrapper is a Module whose `state_dict` / `load_state_dict` are the wrapped model's (no "module." prefix),
so checkpoints are interchangeable with single-process runs.
"""
import hashlib

import numpy as np

from disttrain.autograd.grad_mode import no_grad
from disttrain.nn.module import Module
from disttrain import trace
from disttrain.parallel.buckets import Reducer
from disttrain.parallel.comm import world

__all__ = ["DataParallel", "ModelMismatchError", "verify_same_model", "broadcast_tensors"]


class ModelMismatchError(RuntimeError):
    """The ranks hold different models (names, shapes or dtypes of parameters differ)."""


class DataParallel(Module):
    """Wraps `model` for data parallelism over `comm` (default: all ranks of the job).

    bucket_mb: gradient bucket size in MiB. optimizer: if given, its zero_grad refuses to run while
    gradients are being synchronised. progress: "thread" or "hooks", poll_interval: seconds between the
    progress thread's tests; overlap=False: reduce after backward instead of during it (see
    disttrain.parallel.buckets.Reducer).
    broadcast: copy rank 0's parameters and buffers to every rank (skip only when they are known equal).
    """

    def __init__(self, model, comm=None, bucket_mb=25.0, optimizer=None, progress="thread", broadcast=True,
                 poll_interval=1e-4, overlap=True):
        super().__init__()
        self.module = model
        self.comm = comm if comm is not None else world()
        named = list(model.named_parameters())
        params = {id(p) for _, p in named}        # (a tied weight is one parameter under two state_dict keys)
        buffers = [(n, b) for n, b in model.state_dict(keep_vars=True).items() if id(b) not in params]
        verify_same_model(self.comm, named, buffers, bucket_mb)
        if broadcast:
            broadcast_tensors(self.comm, [p for _, p in named] + [b for _, b in buffers])
        self.reducer = Reducer(named, self.comm, bucket_mb, progress, poll_interval, overlap)
        if optimizer is not None:
            optimizer._grad_sync = self.reducer

    def forward(self, *args, **kwargs):
        if self.reducer.pending():
            raise RuntimeError("forward() while the gradients of the last backward are not synchronised: call "
                               "synchronize() after backward and before the optimizer step")
        with trace.span("forward"):
            return self.module(*args, **kwargs)

    def synchronize(self):
        """Wait for every bucket's allreduce; each parameter's .grad becomes the mean over the ranks."""
        self.reducer.synchronize()

    def pending(self):
        """True between a backward pass's first gradient and the synchronize() that averages them."""
        return self.reducer.pending()

    def no_sync(self):
        """Context manager: backward passes inside accumulate gradients locally, without communication."""
        return self.reducer.no_sync()

    def in_sync(self):
        """True when every rank holds bit-identical parameters (a collective; for tests and debugging)."""
        digest = _digest_arrays([p.data for p in self.module.parameters()])
        return _all_equal(self.comm, digest)

    def state_dict(self, destination=None, prefix="", keep_vars=False):
        return self.module.state_dict(destination, prefix, keep_vars)

    def load_state_dict(self, state_dict, strict=True):
        return self.module.load_state_dict(state_dict, strict)

    def close(self):
        """Remove the gradient callbacks and stop the progress thread (the model works on alone)."""
        self.reducer.close()

    def extra_repr(self):
        r = self.reducer
        return (f"ranks={self.comm.size}, buckets={len(r.buckets)}, bucket_mb={r.bucket_mb}, overlap={r.overlap}, "
                f"progress={r.progress}")


# ---- checks and broadcasts (collectives) ------------------------------------------------------------

def describe(named_params, named_buffers=(), bucket_mb=None):
    """The model layout every rank must agree on: [(kind, name, shape, dtype)] (+ bucket_mb)."""
    rows = [("param", n, tuple(p.shape), str(p.dtype), bool(p.requires_grad)) for n, p in named_params]
    rows += [("buffer", n, tuple(b.shape), str(b.dtype), False) for n, b in named_buffers]
    if bucket_mb is not None:
        rows.append(("setting", "bucket_mb", (), repr(float(bucket_mb)), False))
    return rows


def verify_same_model(comm, named_params, named_buffers=(), bucket_mb=None):
    """Raise ModelMismatchError on every rank unless all ranks describe the same model.

    Fast path: one Allgather of a 32-byte digest. Only when digests differ are the full descriptions
    gathered (pickled) to name the differences; every rank takes the same branch, so none waits alone.
    """
    rows = describe(named_params, named_buffers, bucket_mb)
    digest = hashlib.sha256(repr(rows).encode()).digest()
    if _all_equal(comm, digest, what="model check"):
        return
    everyone = comm.allgather_object(rows, what="model check (descriptions)")
    raise ModelMismatchError(_mismatch_message(everyone))


def _all_equal(comm, digest, what="comparison of digests"):
    mine = np.frombuffer(digest, dtype=np.uint8).copy()
    if comm.size == 1:
        return True
    table = comm.Allgather(mine, what=what)
    return bool((table == table[0]).all())


def _digest_arrays(arrays):
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a.get() if hasattr(a, "get") else a).tobytes())
    return h.digest()


def _mismatch_message(everyone, limit=6):
    lines = [f"the {len(everyone)} ranks hold different models (DataParallel needs the same parameter names, "
             "shapes and dtypes, in the same order, and the same bucket_mb on every rank):"]
    ref = {row[1]: row for row in everyone[0]}
    ref_order = [row[1] for row in everyone[0]]
    for rank, rows in enumerate(everyone[1:], start=1):
        if rows == everyone[0]:
            continue
        mine = {row[1]: row for row in rows}
        diffs = []
        for name in ref_order:
            if name not in mine:
                diffs.append(f"lacks {ref[name][0]} '{name}' {ref[name][2]}")
            elif mine[name] != ref[name]:
                a, b = ref[name], mine[name]
                what = "shape" if a[2] != b[2] else "dtype" if a[3] != b[3] else \
                       "value" if a[0] == "setting" else "requires_grad"
                shown = {"shape": (a[2], b[2]), "dtype": (a[3], b[3]), "value": (a[3], b[3]),
                         "requires_grad": (a[4], b[4])}[what]
                diffs.append(f"'{name}' {what} {shown[1]} (rank 0: {shown[0]})")
        for name in mine:
            if name not in ref:
                diffs.append(f"has extra {mine[name][0]} '{name}' {mine[name][2]}")
        if not diffs:
            diffs.append("same entries in a different order")
        more = f" (+{len(diffs) - limit} more)" if len(diffs) > limit else ""
        lines.append(f"  rank {rank} vs rank 0: " + "; ".join(diffs[:limit]) + more)
    return "\n".join(lines)


def broadcast_tensors(comm, tensors, root=0):
    """Overwrite every tensor with root's values: one Bcast per dtype and device of a packed flat buffer."""
    if comm.size == 1:
        return
    groups = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    with no_grad():
        for group in groups.values():
            xp = group[0].backend.xp
            flat = xp.concatenate([t.data.reshape(-1) for t in group]) if comm.rank == root else \
                xp.empty(sum(t.numel() for t in group), dtype=group[0].dtype)
            comm.Bcast(flat, root=root, what=f"broadcast of rank {root}'s parameters")
            if comm.rank != root:
                offset = 0
                for t in group:
                    n = t.numel()
                    t.copy_(flat[offset:offset + n].reshape(t.shape))
                    offset += n
