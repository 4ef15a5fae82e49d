"""DataParallel: one model replicated on every rank, each rank on its share of the batch, gradients averaged.

    import disttrain.parallel as par
    model = par.DataParallel(model, bucket_mb=25, optimizer=opt)   # broadcast rank 0's weights, check shapes
    for x, y in my_shard_of_the_data:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()              # bucket allreduces start while backward runs; when it returns,
        opt.step()                   # every .grad is the mean over the ranks

With the loss a mean over each rank's B/N examples, the averaged gradient is the gradient of the mean over
all B examples, so N ranks with B/N each take the same steps as one process with B (up to float rounding
of sums taken in another order). Gradient accumulation: run the first k-1 backward passes inside
`with model.no_sync():`; the k-th synchronises the accumulated sum.

sync="deferred" leaves the reductions in flight when backward returns (to overlap them with other work):
call `model.synchronize()` before the optimizer's step. Until then the optimizer refuses to step or to
clear the gradients, and the model refuses to run forward (the optimizer given here gets pre-hooks that
check). `synchronize()` is a no-op once the gradients are averaged, so a loop that calls it works in
either mode.

shard_optimizer (ZeRO, disttrain.parallel.sharded_optimizer): 1 keeps only this rank's 1/N slice of the
optimizer state and updates only that slice of the parameters, then allgathers them; 2 also
reduce-scatters the gradients instead of allreducing them, so a rank holds only its slice's averaged
gradient. Step through `model.optimizer` (the ShardedOptimizer wrapping `optimizer`), and clip with its
`clip_grad_norm_`:

    model = par.DataParallel(model, optimizer=opt, shard_optimizer=2)
    opt = model.optimizer

At construction every rank compares a digest of its parameters' names, shapes and dtypes (and bucket_mb,
sync and shard_optimizer) with the others'; on any difference all ranks raise ModelMismatchError with the
same message naming the differences, instead of deadlocking later in mismatched collectives. Then rank 0's
parameters and persistent buffers are broadcast, so every replica starts from the same weights.

The wrapper is a Module whose `state_dict` / `load_state_dict` are the wrapped model's (no "module." prefix),
so checkpoints are interchangeable with single-process runs.
"""
import hashlib

import numpy as np

from disttrain.autograd.grad_mode import is_grad_enabled, no_grad
from disttrain.nn.module import Module
from disttrain import trace
from disttrain.parallel.buckets import Reducer
from disttrain.parallel.comm import world
from disttrain.parallel.sharded_optimizer import SHARD_STAGES, ShardedOptimizer

__all__ = ["DataParallel", "ModelMismatchError", "verify_same_model", "broadcast_tensors"]


class ModelMismatchError(RuntimeError):
    """The ranks hold different models (names, shapes or dtypes of parameters differ)."""


class DataParallel(Module):
    """Wraps `model` for data parallelism over `comm` (default: all ranks of the job).

    bucket_mb: gradient bucket size in MiB. optimizer: the model's optimizer; it then refuses to step or
    clear gradients while they are being averaged (and is wrapped when shard_optimizer is 1 or 2).
    progress: "thread" or "hooks", poll_interval: seconds between the progress thread's tests; overlap=False:
    reduce after backward instead of during it; sync: "backward" (averaged when backward returns) or
    "deferred" (by synchronize()); see disttrain.parallel.buckets.Reducer. shard_optimizer: 0, 1 or 2
    (the module docstring). broadcast: copy rank 0's parameters and buffers to every rank (skip only when
    they are known equal). broadcast_buffers (torch DDP's): every training forward starts from rank 0's
    buffers (running statistics each rank updates from its own share), so the replicas never drift apart;
    sync_buffers() does it on demand.
    """

    def __init__(self, model, comm=None, bucket_mb=25.0, optimizer=None, progress="thread", broadcast=True,
                 poll_interval=1e-4, overlap=True, sync="backward", shard_optimizer=0, broadcast_buffers=True):
        super().__init__()
        if shard_optimizer not in SHARD_STAGES:
            raise ValueError(f"shard_optimizer must be 0, 1 or 2, got {shard_optimizer!r}")
        if shard_optimizer and optimizer is None:
            raise ValueError(f"shard_optimizer={shard_optimizer} needs the optimizer: DataParallel(..., optimizer=opt)")
        self.module = model
        self.comm = comm if comm is not None else world()
        named = list(model.named_parameters())
        params = {id(p) for _, p in named}        # (a tied weight is one parameter under two state_dict keys)
        buffers = [(n, b) for n, b in model.state_dict(keep_vars=True).items() if id(b) not in params]
        verify_same_model(self.comm, named, buffers, bucket_mb, {"sync": sync, "shard_optimizer": shard_optimizer})
        if broadcast:
            broadcast_tensors(self.comm, [p for _, p in named] + [b for _, b in buffers])
        self.broadcast_buffers = broadcast_buffers
        collective = "reduce_scatter" if shard_optimizer == 2 else "allreduce"
        self.reducer = Reducer(named, self.comm, bucket_mb, progress, poll_interval, overlap, sync, collective)
        self.optimizer = ShardedOptimizer(optimizer, self.reducer, shard_optimizer) if shard_optimizer else optimizer
        self._optimizer_hooks = []
        if optimizer is not None and not shard_optimizer:       # (a ShardedOptimizer checks by itself)
            check = self.reducer.check_synchronized
            self._optimizer_hooks = [
                optimizer.register_zero_grad_pre_hook(lambda opt: check("zero_grad()")),
                optimizer.register_step_pre_hook(lambda opt, args, kwargs: check("step()"))]

    def forward(self, *args, **kwargs):
        if self.reducer.pending():
            raise RuntimeError("forward() while the gradients of the last backward are not synchronised: with "
                               "sync=\"deferred\", call synchronize() after backward and before the optimizer step")
        if self.broadcast_buffers and self.training and is_grad_enabled():   # training forwards run in step
            self.sync_buffers()
        with trace.span("forward"):
            return self.module(*args, **kwargs)

    def sync_buffers(self):
        """Copy rank 0's buffers (persistent or not) to every rank; a collective."""
        buffers = [b for b in self.module.buffers() if b is not None]
        if buffers:
            broadcast_tensors(self.comm, buffers, what="broadcast of rank 0's buffers")

    def synchronize(self):
        """Finish averaging the gradients (sync="deferred"); a no-op once they are averaged."""
        self.reducer.synchronize()

    def pending(self):
        """True between a backward pass's first gradient and the moment its gradients are averaged."""
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
        """Remove the gradient callbacks and the optimizer's hooks and stop the progress thread (the model and
        a plain optimizer work on alone)."""
        self.reducer.close()
        for handle in self._optimizer_hooks:
            handle.remove()
        self._optimizer_hooks = []

    def extra_repr(self):
        r = self.reducer
        return (f"ranks={self.comm.size}, buckets={len(r.buckets)}, bucket_mb={r.bucket_mb}, overlap={r.overlap}, "
                f"progress={r.progress}, sync={r.sync}, collective={r.collective}")


# ---- checks and broadcasts (collectives) ------------------------------------------------------------

def describe(named_params, named_buffers=(), bucket_mb=None, settings=None):
    """The model layout every rank must agree on: [(kind, name, shape, dtype)] (+ bucket_mb and `settings`,
    {name: value})."""
    rows = [("param", n, tuple(p.shape), str(p.dtype), bool(p.requires_grad)) for n, p in named_params]
    rows += [("buffer", n, tuple(b.shape), str(b.dtype), False) for n, b in named_buffers]
    if bucket_mb is not None:
        rows.append(("setting", "bucket_mb", (), repr(float(bucket_mb)), False))
    rows += [("setting", name, (), repr(value), False) for name, value in (settings or {}).items()]
    return rows


def verify_same_model(comm, named_params, named_buffers=(), bucket_mb=None, settings=None):
    """Raise ModelMismatchError on every rank unless all ranks describe the same model (and the same
    bucket_mb and `settings`).

    Fast path: one Allgather of a 32-byte digest. Only when digests differ are the full descriptions
    gathered to name the differences; every rank takes the same branch, so none waits alone.
    """
    rows = describe(named_params, named_buffers, bucket_mb, settings)
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
             "shapes and dtypes, in the same order, and the same settings on every rank):"]
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
                what = "value" if a[0] == "setting" else "shape" if a[2] != b[2] else \
                       "dtype" if a[3] != b[3] else "requires_grad"
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


def broadcast_tensors(comm, tensors, root=0, what=None):
    """Overwrite every tensor with root's values: one Bcast per dtype and device of a packed flat buffer.
    what: the collective's name in time-out reports (default: the broadcast of root's parameters)."""
    if comm.size == 1:
        return
    groups = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    with no_grad():
        for group in groups.values():
            backend = group[0].backend
            if comm.rank == root:
                flat = backend.kernels.bucket_pack(backend.xp, [t.data for t in group])
            else:
                flat = backend.xp.empty(sum(t.numel() for t in group), dtype=group[0].dtype)
            comm.Bcast(flat, root=root, what=what or f"broadcast of rank {root}'s parameters")
            if comm.rank != root:
                for t in group:
                    t.begin_inplace("broadcast_tensors")
                backend.kernels.bucket_unpack(backend.xp, flat, [t.data for t in group])