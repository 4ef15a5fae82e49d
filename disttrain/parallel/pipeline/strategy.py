"""PipelineStrategy: the Trainer's strategy seam (disttrain/train/strategy.py) over K pipeline stages x D replicas.

    strategy = PipelineStrategy.from_spec(spec)        # under mpirun -n K*D
    trainer = Trainer(spec, out_dir=out, strategy=strategy)

Layout: world rank r is stage r % K of replica r // K. The pipe communicator holds one replica's K stages
(rank = stage index): activations and gradients flow there. The stage communicator holds the same stage of
all D replicas: gradients are averaged there after each step's flush (data parallelism of every stage).
Each replica trains on its B/D columns of the train streams (as DataParallelStrategy's shards), cut into
`micro_batches` micro-batches.

What the Trainer's hooks become here:
- prepare_model: with the job's split_points every rank cuts the model itself (the same cut everywhere, so
  a bad split point is the same error on every rank); otherwise rank 0 partitions by a profiled balance and
  broadcasts the partition. Every rank keeps its Stage, whose parameters the optimizer gets.
- forward_backward: PipelineRuntime.step under the job's schedule; the last stage's loss is broadcast to the
  pipe (every rank logs the same number); the carried state is this stage's per-micro-batch state.
- sync_gradients: the mean over the stage communicator (one flat Allreduce per dtype), when D > 1.
- clip_grad_norm: the global norm is the square root of the stages' summed squared norms (an Allreduce over
  the pipe), then every stage scales by the same coefficient, as one process would.
- eval_segment: forward-only through the pipe; each replica evaluates its share of the eval streams
  (shard_eval) and reduce_sum adds the replicas' sums over the stage communicator.
- checkpoints: rank 0 writes the full model's state_dict, receiving the other stages' parameters (plain
  buffers of shapes it knows from its own copy of the model), so `disttrain eval` and local runs load it.
"""
import json
import math

import numpy as np

import disttrain as dt
from disttrain import trace
from disttrain.nn import functional as F
from disttrain.nn.utils import _grad_norm, clip_grad_norm_
from disttrain.parallel.comm import world
from disttrain.parallel.launch import local_size
from disttrain.parallel.strategy import MPIStrategy
from disttrain.parallel.pipeline.p2p import StageLink
from disttrain.parallel.pipeline.partition import Partition, partition
from disttrain.parallel.pipeline.runtime import PipelineRuntime
from disttrain.train import checkpoint as ckpt
from disttrain.train.jobspec import JobSpecError
from disttrain.train.strategy import describe_threads

__all__ = ["PipelineStrategy", "PipelineLayoutError"]

_PARAM_TAG = 31000       # full-model gathering for checkpoints (below the pipe's header tag)


class PipelineLayoutError(JobSpecError):
    """The world cannot hold the requested stages x replicas, the batch does not split into micro-batches, or
    the split points do not cut the model."""


class PipelineStrategy(MPIStrategy):
    """Pipeline (x data) parallelism for the Trainer: same interface as LocalStrategy plus its model hooks."""

    name = "pipeline"

    def __init__(self, comm=None, stages=2, micro_batches=1, schedule="1f1b", split_points=None,
                 checkpointing=False, batch_size=None, bptt=None, device="cpu", loss="token_mean", source=None):
        self.comm = comm if comm is not None else world()
        if stages < 1 or self.comm.size % stages:
            raise PipelineLayoutError(f"pipeline: {self.comm.size} processes do not divide into stages = {stages} "
                                      f"(the world size must be a multiple of the stages)")
        self.stages, self.replicas = stages, self.comm.size // stages
        self.stage, self.replica = self.comm.rank % stages, self.comm.rank // stages
        if batch_size is not None and (batch_size % self.replicas or (batch_size // self.replicas) % micro_batches):
            raise PipelineLayoutError(f"pipeline: batch_size = {batch_size} over {self.replicas} replicas is "
                                      f"{batch_size / self.replicas:g} streams each, which micro_batches = "
                                      f"{micro_batches} does not divide")
        self.micro_batches, self.schedule, self.split_points = micro_batches, schedule, split_points
        self.checkpointing, self.batch_size, self.bptt = checkpointing, batch_size, bptt
        self.device, self.loss = device, loss
        self.source = source                  # the job file, named in errors
        self.model_parameters = None          # the whole model's parameter count (prepare_model)
        self.pipe = self.comm.Split(color=self.replica, key=self.stage)
        self.stage_group = self.data_group = self.comm.Split(color=self.stage, key=self.replica)
        self.partition = self.full_model = self.stage_module = self.runtime = self.link = None
        self._eval_runtimes = {}

    @classmethod
    def from_spec(cls, spec, comm=None):
        p = spec.parallel
        return cls(comm, stages=p.stages, micro_batches=p.micro_batches, schedule=p.schedule,
                   split_points=p.split_points, checkpointing=p.stage_checkpointing,
                   batch_size=spec.data.batch_size, bptt=spec.data.bptt, device=spec.train.device,
                   loss=spec.optim.loss, source=spec.source)

    def attach(self, model, optimizer=None):
        """Nothing to do: every rank built the model from the same seed, and prepare_model cut it."""

    def describe(self, spec):
        batch = spec.data.batch_size
        streams = batch // self.replicas
        recompute = ", stage checkpointing" if self.checkpointing else ""
        return [f"pipeline: {self.comm.size} ranks ({local_size()} on this node) = {self.stages} stages x "
                f"{self.replicas} replica{'s' if self.replicas > 1 else ''}, {streams} of the batch's {batch} streams "
                f"per replica in {self.micro_batches} micro-batches of {streams // self.micro_batches}, schedule "
                f"{self.schedule}{recompute}, {describe_threads(spec)} per rank; {self._waits()}",
                *self.partition.describe().splitlines()]

    def parameter_count(self, model):
        """The whole model's parameters (every stage's), not this rank's stage's."""
        return self.model_parameters

    # ---- the model -------------------------------------------------------------------------------
    def prepare_model(self, model):
        """This rank's Stage of `model` (rank 0 chooses the partition, every rank follows it)."""
        self.full_model = model
        self.model_parameters = sum(p.numel() for p in model.parameters())
        if self.split_points is not None:
            self.partition = self._user_partition(model)
        else:
            layout = self._partition(model).to_dict() if self.comm.rank == 0 else None
            self.partition = Partition.from_dict(self.comm.bcast_object(layout, root=0,
                                                                        what="broadcast of the partition"))
        self.stage_module = self.partition.build_stage(model, self.stage)
        _release_other_stages(model, self.stage_module)
        self.link = StageLink(self.pipe, self.stage, self.stages, xp=_array_module(model))
        self.runtime = self._runtime(self.micro_batches, self.schedule)
        return self.stage_module

    def _user_partition(self, model):
        """The cut at the job's split_points (no profile: the same on every rank), or PipelineLayoutError."""
        try:
            return partition(model, None, self.stages, split_points=self.split_points)
        except (ValueError, TypeError) as exc:
            points = json.dumps(self.split_points)
            raise PipelineLayoutError(f"{self.source or '<job>'}: [parallel] split_points = {points} with stages = "
                                      f"{self.stages}: {str(exc).removeprefix('split_points: ')}") from None

    def _partition(self, model):
        if self.stages == 1:
            return partition(model, None, self.stages)
        streams = (self.batch_size or self.micro_batches) // self.replicas // self.micro_batches
        tokens = np.zeros((self.bptt or 1, max(streams, 1)), dtype=np.int64)
        sample = dt.tensor(tokens, device=self.device)
        with_loss = lambda logits: self._loss_fn(logits, tokens)      # noqa: E731  (the last stage's cost)
        return partition(model, sample, self.stages, repeats=3, statistic="min", loss_fn=with_loss)

    def _runtime(self, micro_batches, schedule):
        return PipelineRuntime(self.stage_module, self.link, schedule=schedule, micro_batches=micro_batches,
                               batch_axis=1, checkpointing=self.checkpointing, device=self.device)

    # ---- one step --------------------------------------------------------------------------------
    def forward_backward(self, trainer, inputs, targets):
        scale = inputs.shape[0] if self.loss == "sum_over_time" else 1.0
        result = self.runtime.step(inputs, targets, self._loss_fn, trainer.hidden, backward_scale=scale)
        return self._broadcast_loss(result.loss), result.states

    def eval_segment(self, trainer, inputs, targets, hidden):
        runtime = self._eval_runtime(inputs.shape[1])
        result = runtime.forward_only(inputs, targets, self._loss_fn, hidden)
        return self._broadcast_loss(result.loss), result.states

    def _eval_runtime(self, batch):
        """A forward-only runtime for evaluation batches: the most micro-batches <= the job's that divide it."""
        micro = max(m for m in range(1, self.micro_batches + 1) if batch % m == 0)
        if micro not in self._eval_runtimes:
            self._eval_runtimes[micro] = self._runtime(micro, "gpipe")
        return self._eval_runtimes[micro]

    def _loss_fn(self, logits, targets):
        return F.cross_entropy(logits, dt.tensor(targets.reshape(-1), device=self.device))

    def _broadcast_loss(self, loss):
        """The last stage's loss on every stage of the pipe (one 8-byte Bcast)."""
        buf = np.array([loss if loss is not None else 0.0], dtype=np.float64)
        with trace.span("broadcast loss", lane="comm"):
            self.pipe.Bcast(buf, root=self.stages - 1, what="broadcast of the loss from the last stage")
        return float(buf[0])

    def sync_gradients(self, params):
        """Average every gradient over the D replicas of this stage (nothing to do for one replica)."""
        if self.replicas == 1:
            return
        grads = [p.grad for p in params if p.grad is not None]
        with trace.span("stage allreduce", lane="comm"):
            for dtype in sorted({g.dtype for g in grads}, key=str):
                same = [g for g in grads if g.dtype == dtype]
                xp = same[0].backend.xp
                flat = xp.concatenate([g.data.reshape(-1) for g in same])
                self.stage_group.Allreduce(flat, what=f"allreduce of stage {self.stage}'s gradients")
                flat /= self.replicas
                offset = 0
                for g in same:
                    g.data[...] = flat[offset:offset + g.data.size].reshape(g.shape)
                    offset += g.data.size

    def clip_grad_norm(self, params, max_norm):
        """Clip by the norm of all stages' gradients together; returns that norm before clipping."""
        grads = [p.grad for p in params if p.grad is not None]
        local = _grad_norm(grads, 2.0) if grads else 0.0
        squares = np.array([local * local], dtype=np.float64)
        self.pipe.Allreduce(squares, what="allreduce of the squared gradient norm")
        total = math.sqrt(float(squares[0]))
        coef = float(max_norm) / (total + 1e-6)
        if coef < 1.0 and grads:       # clip_grad_norm_ scales by its max_norm / (local + 1e-6): make that coef
            clip_grad_norm_(params, coef * (local + 1e-6))
        return total

    # ---- job checkpoints: the whole model on rank 0 ----------------------------------------------
    def gather_checkpoint(self, trainer):
        """(carried (h, c) (L, B, H) or None, the whole model's arrays, the optimizer state in the whole model's
        parameter order) on rank 0, (None, None, None) elsewhere; a collective over all ranks."""
        hidden = self._gather_hidden(trainer.hidden)          # every replica takes part (stage allgather)
        local_index = {name: i for i, (name, _) in enumerate(self.stage_module.named_parameters())}
        full_names = [name for name, _ in self.full_model.named_parameters()]
        state = trainer.optimizer.state_dict()
        _one_group(state)
        to_full = {local_index[name]: j for j, name in enumerate(full_names) if name in local_index}
        arrays, scalars = ckpt.split_optimizer_state(
            {"state": {to_full[i]: entry for i, entry in state["state"].items()}, "param_groups": []})
        arrays.update({f"model.{name}": t.numpy() for name, t in self.stage_module.state_dict().items()})
        arrays.update(hidden or {})
        merged = self._gather_to_main(arrays, scalars["state"])
        if merged is None:
            return None, None, None
        arrays, scalar_state = merged
        model = {name[len("model."):]: a for name, a in arrays.items() if name.startswith("model.")}
        group = dict(state["param_groups"][0], params=list(range(len(full_names))))
        optimizer_state = ckpt.join_optimizer_state(arrays, {"state": scalar_state, "param_groups": [group]})
        return self._stack_hidden(arrays), model, optimizer_state

    def _gather_hidden(self, states):
        """This stage's carried LSTM states, all replicas' streams side by side: {"hidden.<block>.h": (B, H)}."""
        if states is None:
            return None
        out = {}
        for i, name in enumerate(self.stage_module.block_names):
            if states[0][i] is None:
                continue
            for part, label in enumerate("hc"):
                mine = np.concatenate([s[i][part].numpy() for s in states], axis=0)     # (B/D, H)
                table = self.stage_group.Allgather(np.ascontiguousarray(mine), what="allgather of the carried state")
                out[f"hidden.{name}.{label}"] = np.concatenate(list(table), axis=0)
        return out

    def _stack_hidden(self, arrays):
        """{"hidden.<block>.h": (B, H)} of all stages -> (h, c) each (L, B, H) in block order, or None."""
        names = [n for n in self.partition.block_names if f"hidden.{n}.h" in arrays]
        if not names:
            return None
        return tuple(np.stack([arrays[f"hidden.{n}.{label}"] for n in names]) for label in "hc")

    def _gather_to_main(self, arrays, scalars):
        """Replica 0's stages' {name: array} and JSON scalars merged on rank 0 (None elsewhere).

        The names, shapes and dtypes go as small metadata (gather_object), the arrays as plain buffers."""
        if self.replica != 0:
            return None
        catalog = self.pipe.gather_object(([(n, a.shape, a.dtype.str) for n, a in arrays.items()], scalars), root=0,
                                          what="gather of the checkpoint's array list")
        if self.stage != 0:
            for array in arrays.values():
                self.pipe.Send(np.ascontiguousarray(array), dest=0, tag=_PARAM_TAG, what="checkpoint send")
            return None
        merged, merged_scalars = dict(arrays), dict(scalars)
        for k in range(1, self.stages):
            names, their_scalars = catalog[k]
            for name, shape, dtype in names:
                merged[name] = self.pipe.Recv(np.empty(shape, dtype=dtype), source=k, tag=_PARAM_TAG,
                                              what="checkpoint receive")
            merged_scalars.update(their_scalars)
        return merged, merged_scalars

    def load_model_state(self, model, state):
        """Load this stage's entries of the whole model's state_dict."""
        mine = list(self.stage_module.state_dict())
        missing = [name for name in mine if name not in state]
        if missing:
            raise RuntimeError(f"missing entries for pipeline stage {self.stage}: {missing}")
        self.stage_module.load_state_dict({name: state[name] for name in mine})

    def load_optimizer_state(self, optimizer, state):
        """The whole-model optimizer state (as gather_checkpoint writes it) cut to this stage's parameters."""
        _one_group(state)
        full_index = {name: j for j, (name, _) in enumerate(self.full_model.named_parameters())}
        mine = [full_index[name] for name, _ in self.stage_module.named_parameters()]
        group = dict(state["param_groups"][0], params=list(range(len(mine))))
        optimizer.load_state_dict({"state": {i: state["state"][j] for i, j in enumerate(mine) if j in state["state"]},
                                   "param_groups": [group]})

    def shard_hidden(self, trainer, h, c):
        """The checkpoint's (h, c) (L, B, H) as this stage's per-micro-batch states of this replica's streams."""
        if h is None:
            return None
        width = h.shape[1] // self.replicas
        columns = slice(self.replica * width, (self.replica + 1) * width)
        states = [[] for _ in range(self.micro_batches)]
        for block in self.stage_module.blocks:
            layer = getattr(block, "layer", None)          # LSTM layer blocks carry (h, c); the others nothing
            if layer is None:
                for s in states:
                    s.append(None)
                continue
            pieces = [np.split(a[layer, columns], self.micro_batches, axis=0) for a in (h, c)]
            for m, s in enumerate(states):
                s.append(tuple(dt.tensor(p[m], device=self.device) for p in pieces))
        return states

    def close(self):
        pass


def _release_other_stages(model, stage):
    """Free the arrays of the parameters other stages own: this rank only ever reads its stage's, and the
    whole model's names (all that the checkpoint code needs of it) stay."""
    mine = {id(p) for p in stage.parameters()}
    for p in model.parameters():
        if id(p) not in mine:
            p.data = p.backend.xp.empty((0,) * p.data.ndim, dtype=p.data.dtype)     # not a view: frees
            p.grad = None


def _one_group(state):
    if len(state["param_groups"]) != 1:
        raise ValueError(f"pipeline checkpoints support optimizers with one parameter group, got "
                         f"{len(state['param_groups'])}")


def _array_module(model):
    params = list(model.parameters())
    return params[0].backend.xp if params else np
