"""Sharded optimizer state for data parallelism (ZeRO stages 1 and 2, Rajbhandari et al. 2020).

    model = DataParallel(model, optimizer=dt.optim.Adam(model.parameters()), shard_optimizer=2)
    opt = model.optimizer                      # a ShardedOptimizer
    opt.zero_grad(); loss.backward()           # stage 2: each rank receives its slice's averaged gradient
    norm = opt.clip_grad_norm_(1.0)            # the global norm, as disttrain.nn.utils.clip_grad_norm_
    opt.step()                                 # update this rank's slice, allgather the parameters

Partition (as DeepSpeed's): each gradient bucket's flat space (disttrain.parallel.buckets.Bucket) is cut into
N equal contiguous slices, the last one padded, and rank r owns slice r of every bucket. A parameter's part
in this rank's slice is a *piece*: a 1-D Parameter viewing the rank's slice buffer. The wrapped optimizer's
own class runs on the pieces (one instance per bucket, built as cls(param_groups, **defaults), its groups
mirroring the wrapped optimizer's), so its per-element update is reused unchanged and its state (Adam's
moments, SGD's momentum buffer) exists only for this rank's pieces: 1/N of the whole, plus at most N - 1
padding elements per bucket that no piece covers. A parameter with no gradient on any rank is skipped, as in
one process (so Adam's per-parameter step counts stay equal too).

Stage 1 keeps the allreduce of the gradients: every rank holds the whole averaged gradient and updates its
slice from it. Stage 2 reduce-scatters them instead (the same volume as an allreduce, whose second half an
allgather is): a rank only ever holds its slice of the averaged gradient, and the parameters' .grad stay None.

A step, bucket by bucket: copy this rank's slice of the parameters into the slice buffer (so a model loaded
or changed in between is honoured), give each piece its gradient (stage 1: a view of its parameter's .grad;
stage 2: of the bucket's slice), run the wrapped optimizer's update on the pieces, and start the allgather
of the slice. While one bucket's allgather runs the next bucket is updated; a finished allgather is copied
into the parameters with copy_, which bumps their versions, so a graph recorded before the step fails at
backward as with any optimizer. Every wait is bounded by the communicator's watchdog.

`param_groups` is the wrapped optimizer's list: LR schedules built on either object change the lr the
pieces use (copied into them at each step). `state_dict()` gathers the full state in the wrapped optimizer's
own format and `load_state_dict()` takes such a state and keeps this rank's slice, so a checkpoint resumes on
any number of ranks, sharded or not.
"""
import copy
import math

import numpy as np

from disttrain.autograd.grad_mode import enable_grad, no_grad
from disttrain.nn.parameter import Parameter
from disttrain.nn.utils import clip_grad_norm_, grad_norm, norm_of_norms, norm_order
from disttrain.optim.optimizer import Optimizer
from disttrain import trace
from disttrain.tensor.tensor import Tensor

__all__ = ["ShardedOptimizer", "SHARD_STAGES"]

SHARD_STAGES = (0, 1, 2)
_COLLECTIVE = {1: "allreduce", 2: "reduce_scatter"}


class ShardedOptimizer(Optimizer):
    """Runs `optimizer`'s update rule on this rank's slice of the parameters of `reducer` (a
    disttrain.parallel.buckets.Reducer over the same parameters on every rank), ZeRO `stage` 1 or 2.

    An Optimizer over the wrapped optimizer's param groups (the same list: an LR schedule of either changes
    both), whose step and state_dict are collectives: every rank calls them (and load_state_dict, with the
    same full state, though it only slices it). It takes the wrapped optimizer's state over, sliced; the
    wrapped optimizer refuses to step from then on (step this object). `state` stays empty: this rank's
    slices live in one optimizer of the wrapped class per bucket.
    """

    def __init__(self, optimizer, reducer, stage=1):
        if stage not in _COLLECTIVE:
            raise ValueError(f"ShardedOptimizer: stage must be 1 or 2, got {stage!r}")
        if reducer.collective != _COLLECTIVE[stage]:
            raise ValueError(f"ShardedOptimizer stage {stage} needs a Reducer with collective="
                             f"{_COLLECTIVE[stage]!r}, got {reducer.collective!r}")
        super().__init__(optimizer.param_groups, optimizer.defaults)
        self.param_groups = optimizer.param_groups      # the same dicts: LR schedules may hold either object
        self.optimizer = optimizer
        self.reducer = reducer
        self.comm = reducer.comm
        self.stage = stage
        index_of = _optimizer_indices(optimizer, reducer)
        self._shards = [_Shard(bucket, self.comm.rank, index_of, optimizer) for bucket in reducer.buckets]
        self._trained = [p for _, p in reducer.named_params]
        if optimizer.state:
            self.load_state_dict(optimizer.state_dict())
            optimizer.state.clear()      # a whole unsharded copy: this object holds the slices now
        optimizer.register_step_pre_hook(_refuse_wrapped_step)

    # ---- the training-loop calls -----------------------------------------------------------
    _shards = None

    def add_param_group(self, group):
        if self._shards is not None:
            raise RuntimeError("ShardedOptimizer: add param groups to the optimizer before sharding it")
        super().add_param_group(group)

    def _zero_grad(self, set_to_none):
        """The parameters' .grad, and in stage 2 this rank's averaged slices of them."""
        self.reducer.check_synchronized("zero_grad()")
        super()._zero_grad(set_to_none)
        if self.stage == 2:
            for bucket in self.reducer.buckets:
                bucket.zero_shard_grad(set_to_none)

    def _step(self, closure=None):
        """Update this rank's slice of every parameter that has a gradient, then allgather the parameters."""
        loss = None
        if closure is not None:
            with enable_grad():
                loss = closure()
        self.reducer.check_synchronized("step()")
        hypers = [{k: v for k, v in group.items() if k != "params"} for group in self.param_groups]
        with no_grad(), trace.span("sharded optimizer step"):
            in_flight = None
            for k, shard in enumerate(self._shards):
                changed = shard.update(self.stage, hypers)
                gathering = shard.start_allgather(self.comm, changed)
                if k + 1 < len(self._shards):
                    # moved forward while the next bucket updates (the last one is waited for at once: a
                    # second thread testing it then only contends with the waiting one)
                    self.reducer.drive(gathering.handle)
                if in_flight is not None:
                    in_flight.finish()
                in_flight = gathering
            if in_flight is not None:
                in_flight.finish()
        return loss

    def clip_grad_norm_(self, max_norm, norm_type=2.0, error_if_nonfinite=False):
        """Clip the gradients of all the reducer's parameters by their global norm, exactly as
        disttrain.nn.utils.clip_grad_norm_ over the whole averaged gradients would, for every order it takes;
        returns that norm (a collective in stage 2: one allreduce of a float for a finite order p > 0, an
        allgather of a float per rank for the other orders, an allreduce of one flag per parameter for order 0)."""
        self.reducer.check_synchronized("clip_grad_norm_()")
        if self.stage == 1:        # every rank holds the whole averaged gradient
            return clip_grad_norm_(self._trained, max_norm, norm_type, error_if_nonfinite)
        holders = [holder for shard in self._shards for holder in shard.gradient_holders()]
        norm_type = norm_order(norm_type, "ShardedOptimizer.clip_grad_norm_")
        total = self._nonzero_gradients() if norm_type == 0 else self._norm_of_rank_norms(holders, norm_type)
        return clip_grad_norm_(holders, max_norm, norm_type, error_if_nonfinite, total_norm=total)

    def _norm_of_rank_norms(self, holders, norm_type):
        """The norm of order norm_type (not 0) of the whole averaged gradients: that of the ranks' norms over
        their slices, since every such order combines so (sums of |x| ** p, maxima, minima, NaN), ranks without
        a slice left out (they hold no element). A finite p > 0, what clipping uses every step, takes one 8-byte
        allreduce of the sums of |x| ** p (a NaN stays NaN in a sum); the other orders an allgather of the
        ranks' norms (a maximum over MPI need not keep a NaN)."""
        if 0 < norm_type < math.inf:
            local = grad_norm([h.grad for h in holders], norm_type) if holders else 0.0
            summed = self.comm.Allreduce(np.array([local ** norm_type]), what="allreduce of the gradient norm")
            return float(summed[0]) ** (1.0 / norm_type)
        local = grad_norm([h.grad for h in holders], norm_type) if holders else None
        ranks = [v for v in self.comm.allgather_object(local, what="allgather of the gradient norms") if v is not None]
        return norm_of_norms(ranks, norm_type) if ranks else 0.0

    def _nonzero_gradients(self):
        """Order 0, as torch's: how many gradients have a nonzero element, on whichever rank it is."""
        flags = [shard.nonzero_gradients() for shard in self._shards]
        anywhere = self.comm.Allreduce(np.concatenate(flags) if flags else np.zeros(0), op="max",
                                       what="allreduce of which gradients are nonzero")
        return float(anywhere.sum())

    # ---- save / resume ---------------------------------------------------------------------
    def state_dict(self):
        """The full, unsharded state in the wrapped optimizer's format (Optimizer.state_dict: parameters
        numbered by position across its groups), on every rank (a collective)."""
        result = super().state_dict()
        layouts = self.comm.allgather_object(self._state_layout(), what="allgather of optimizer state layouts")
        entries = {}
        for layout in layouts:
            for index, entry in layout.items():
                entries.setdefault(index, entry)
        state = {index: {key: value for key, is_array, value in entry if not is_array}
                 for index, entry in sorted(entries.items())}
        for shard in self._shards:
            shard.gather_state(self.comm, entries, state)
        result["state"] = {index: {key: state[index][key] for key, _, _ in entries[index]} for index in state}
        return result

    def _state_layout(self):
        """{optimizer index: [(key, is_array, value or None)]} of this rank's pieces that have state."""
        layout = {}
        for shard in self._shards:
            for piece in shard.pieces:
                entry = shard.optimizer.state.get(piece.param)
                if entry and piece.index not in layout:
                    layout[piece.index] = [(k, hasattr(v, "shape"), None if hasattr(v, "shape") else v)
                                           for k, v in entry.items()]
        return layout

    def load_state_dict(self, state_dict):
        """Load a full state (the wrapped optimizer's format, from any number of ranks, sharded or not) and keep
        this rank's slice. Nothing changes unless the whole state fits the parameters."""
        saved_groups = state_dict["param_groups"]
        self._check_layout(saved_groups)
        params = self._params()
        for index, entry in state_dict["state"].items():
            _check_entry(index, entry, params)
        for group, saved in zip(self.param_groups, saved_groups):    # in place: the wrapped optimizer's too
            group.update(copy.deepcopy({k: v for k, v in saved.items() if k != "params"}))
        for shard in self._shards:
            shard.load_state(state_dict["state"])

    def state_buffers(self, group):
        return self.optimizer.state_buffers(group)

    def state_nbytes(self):
        """Bytes of the arrays in this rank's optimizer state."""
        return sum(v.nbytes for shard in self._shards if shard.optimizer is not None
                   for entry in shard.optimizer.state.values() for v in entry.values() if hasattr(v, "nbytes"))

    def __repr__(self):
        return (f"ShardedOptimizer(stage={self.stage}, rank {self.comm.rank} of {self.comm.size}, "
                f"{sum(len(s.pieces) for s in self._shards)} pieces in {len(self._shards)} buckets) of "
                + super().__repr__().replace("ShardedOptimizer", type(self.optimizer).__name__, 1))


def _refuse_wrapped_step(optimizer, args, kwargs):
    raise RuntimeError(f"this {type(optimizer).__name__} is wrapped by a ShardedOptimizer, which holds its state: "
                       "step the ShardedOptimizer (DataParallel(..., shard_optimizer=...).optimizer) instead")


def _optimizer_indices(optimizer, reducer):
    """{id(parameter): (its position across the optimizer's groups, its group)} of the parameters the reducer
    trains; a frozen one (requires_grad False: never a gradient, never a step) keeps its position and no entry,
    and any other must be the reducer's."""
    trained = {id(p) for _, p in reducer.named_params}
    index_of, index = {}, 0
    for g, group in enumerate(optimizer.param_groups):
        for p in group["params"]:
            if id(p) in trained:
                index_of[id(p)] = (index, g)
            elif p.requires_grad:
                raise ValueError(f"ShardedOptimizer: the optimizer's parameter {index} (shape {p.shape}) is not one "
                                 "the data-parallel model trains (a parameter of the model that requires grad)")
            index += 1
    return index_of


def _check_entry(index, entry, params):
    """A loaded state entry must name a parameter, and its arrays must have that parameter's shape."""
    if not 0 <= index < len(params):
        raise ValueError(f"loaded state dict has state for parameter index {index}, which none of its param "
                         "groups lists")
    for key, value in entry.items():
        if hasattr(value, "shape") and tuple(value.shape) != params[index].shape:
            raise ValueError(f"loaded state '{key}' of parameter {index} has shape {tuple(value.shape)}, the "
                             f"parameter has shape {params[index].shape}")


class _Piece:
    """Elements lo..hi of bucket parameter i (optimizer index `index`), at `pos` in the rank's slice."""
    __slots__ = ("i", "index", "lo", "hi", "pos", "param")

    def __init__(self, i, index, lo, hi, pos, param):
        self.i, self.index, self.lo, self.hi, self.pos, self.param = i, index, lo, hi, pos, param


class _Shard:
    """This rank's slice of one bucket: the slice buffer, the pieces viewing it, the optimizer over them."""

    def __init__(self, bucket, rank, index_of, optimizer):
        self.bucket = bucket
        xp = bucket.xp
        self.flat = xp.zeros(bucket.shard_numel, dtype=bucket.dtype)
        self.spans = bucket.spans_of(rank)
        self.indices = {i: index_of[id(p)][0] for i, p in enumerate(bucket.params) if id(p) in index_of}
        groups = [[] for _ in optimizer.param_groups]
        for i, lo, hi, pos in self.spans:
            found = index_of.get(id(bucket.params[i]))
            if found is not None:
                piece = _Piece(i, found[0], lo, hi, pos, Parameter(self.flat[pos:pos + hi - lo]))
                groups[found[1]].append(piece)
        self.pieces = [piece for group in groups for piece in group]    # in the shard optimizer's order
        self.optimizer = _optimizer_like(optimizer, groups) if self.pieces else None

    # ---- a step ------------------------------------------------------------------------------
    def update(self, stage, hypers):
        """Load this rank's slice of the parameters, give the pieces their gradients, update them. Returns the
        bucket's parameters that the step changes on some rank: the optimizer's, where they have a gradient."""
        params = self.bucket.params
        for i, lo, hi, pos in self.spans:
            self.flat[pos:pos + hi - lo] = params[i].data.reshape(-1)[lo:hi]
        changed = [i for i in self.indices if self._has_gradient(stage, i)]
        if self.optimizer is None:
            return changed
        for group, values in zip(self.optimizer.param_groups, hypers):
            group.update(values)
        for piece in self.pieces:
            grad = self._gradient(stage, piece)
            piece.param.grad = None if grad is None else Tensor(grad)
        self.optimizer.step()
        for piece in self.pieces:
            piece.param.grad = None
        return changed

    def _has_gradient(self, stage, i):
        bucket = self.bucket
        if stage == 1:
            return bucket.params[i].grad is not None
        return bucket.shard_grad is not None and bucket.shard_counts[i] > 0

    def _gradient(self, stage, piece):
        if not self._has_gradient(stage, piece.i):
            return None
        if stage == 1:
            return self.bucket.params[piece.i].grad.data.reshape(-1)[piece.lo:piece.hi]
        return self.bucket.shard_grad[piece.pos:piece.pos + piece.hi - piece.lo]

    def start_allgather(self, comm, changed):
        """Start gathering every rank's slice; the returned _Allgather copies `changed` parameters out of it."""
        bucket = self.bucket
        gathered = bucket.xp.empty(comm.size * bucket.shard_numel, dtype=bucket.dtype)
        handle = comm.Iallgather(self.flat, gathered, what=f"allgather of parameter bucket {bucket.index}")
        return _Allgather(bucket, gathered, handle, changed)

    def nonzero_gradients(self):
        """Per parameter of the bucket: 1.0 when its gradient has a nonzero (or NaN) element in this rank's slice
        (stage 2), else 0.0."""
        bucket = self.bucket
        flags = np.zeros(len(bucket.params))
        if bucket.shard_grad is not None:
            for i, lo, hi, pos in self.spans:
                if bucket.shard_counts[i] > 0:
                    flags[i] = float(bool((bucket.shard_grad[pos:pos + hi - lo] != 0).any()))
        return flags

    def gradient_holders(self):
        """Tensors whose .grad are this rank's slices of the averaged gradients (stage 2), for clipping."""
        bucket = self.bucket
        holders = []
        if bucket.shard_grad is None:
            return holders
        for i, lo, hi, pos in self.spans:
            if bucket.shard_counts[i] > 0:
                view = bucket.shard_grad[pos:pos + hi - lo]
                holder = Tensor(view)
                holder.grad = Tensor(view)
                holders.append(holder)
        return holders

    # ---- save / resume -------------------------------------------------------------------------
    def gather_state(self, comm, entries, state):
        """Fill state[index][key] with the whole array of every array-valued entry of this bucket's parameters,
        allgathered key by key (every rank takes part, with zeros where it has no such state)."""
        bucket = self.bucket
        owners = {i: index for i, index in self.indices.items() if index in entries}
        arrays = {index: {key for key, is_array, _ in entries[index] if is_array} for index in owners.values()}
        for key in sorted(set().union(*arrays.values())):
            send = bucket.xp.zeros(bucket.shard_numel, dtype=bucket.dtype)
            for piece in self.pieces:
                value = self.optimizer.state.get(piece.param, {}).get(key)
                if value is not None:
                    send[piece.pos:piece.pos + piece.hi - piece.lo] = value
            table = comm.Allgather(send, what=f"allgather of optimizer state '{key}' of bucket {bucket.index}")
            flat = table.reshape(-1)
            for i, index in owners.items():
                if key in arrays[index]:
                    p = bucket.params[i]
                    state[index][key] = _host_copy(flat[bucket.offsets[i]:bucket.offsets[i] + p.numel()]
                                                   .reshape(p.shape))

    def load_state(self, full_state):
        """This rank's slice of each parameter's entry in `full_state` (already checked) into the optimizer."""
        if self.optimizer is None:
            return
        state = {}
        for k, piece in enumerate(self.pieces):
            entry = full_state.get(piece.index)
            if entry:
                state[k] = {key: value.reshape(-1)[piece.lo:piece.hi] if hasattr(value, "shape") else value
                            for key, value in entry.items()}
        groups = self.optimizer.state_dict()["param_groups"]
        self.optimizer.load_state_dict({"state": state, "param_groups": groups})


def _optimizer_like(optimizer, groups):
    """An optimizer of `optimizer`'s class over the pieces: one group per group of it, same hyper-parameters."""
    cls = type(optimizer)
    param_groups = [{**{k: v for k, v in group.items() if k != "params"}, "params": [p.param for p in pieces]}
                    for group, pieces in zip(optimizer.param_groups, groups)]
    try:
        return cls(param_groups, **optimizer.defaults)
    except TypeError as exc:
        raise TypeError(f"ShardedOptimizer builds a {cls.__name__} over each rank's slices as "
                        f"{cls.__name__}(param_groups, **optimizer.defaults), which failed: {exc}") from exc


class _Allgather:
    """One bucket's parameter allgather in flight; finish() waits and copies the result into the parameters."""

    def __init__(self, bucket, gathered, handle, changed):
        self.bucket, self.gathered, self.handle, self.changed = bucket, gathered, handle, changed

    def finish(self):
        bucket = self.bucket
        self.handle.wait()
        trace.record(f"allgather bucket {bucket.index}", self.handle.started_at, self.handle.completed_at,
                     lane="comm", bytes=bucket.nbytes, params=len(bucket.params))
        for i in self.changed:
            p, offset = bucket.params[i], bucket.offsets[i]
            p.copy_(self.gathered[offset:offset + p.numel()].reshape(p.shape))


def _host_copy(array):
    """A NumPy copy of a NumPy or CuPy array."""
    return array.get() if hasattr(array, "get") else array.copy()
