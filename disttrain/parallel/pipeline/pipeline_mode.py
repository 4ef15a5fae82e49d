"""PipelineMode: the mode interface (disttrain/train/mode.py) over K pipeline stages x D replicas.

    mode = PipelineMode(stages=2, micro_batches=4)     # under mpirun -n K*D
    trainer = Trainer(model, data, optimizer, mode=mode)

Layout: world rank r is stage r % K of replica r // K. The pipe communicator holds one replica's K stages
(rank = stage index): activations and gradients flow there. The stage communicator holds the same stage of
all D replicas: gradients are averaged there after each step's flush (data parallelism of every stage). Each
replica trains on its share of every batch (`train_share`: replica d of D), cut into `micro_batches`
micro-batches along the data's batch axis.

What the mode's calls become here:
- prepare: the model is cut along its blocks (disttrain.models.protocol: `pipeline_blocks()`, or an
  nn.Sequential's positions). With split_points every rank cuts it itself (the same cut everywhere, so a bad
  split point is the same error on every rank); otherwise rank 0 balances a profile of one micro-batch of the
  data and broadcasts the partition, or the reason no cut fits (tied weights across every cut), which every
  rank then raises. Measuring its stage's step memory, a rank may find a cut that does not carry one Tensor:
  the ranks agree on that before going on, so all stop with the same one-line error. Every rank keeps its Stage
  and gets an optimizer over its parameters.
- forward_backward: PipelineRuntime.step under the schedule; the last stage computes the model's loss on its
  output (protocol.output_loss) and the loss is broadcast to the pipe (every rank logs the same number); the
  gradients are averaged over the stage communicator when D > 1, and every replica then takes the first
  replica's buffers (running statistics), as data-parallel ranks take rank 0's. The carried state is this
  stage's, per micro-batch and per block.
- clip_grad_norm: the global norm is the square root of the stages' summed squared norms (an Allreduce over
  the pipe), then every stage clips with that total, as one process would.
- forward_only: forward through the pipe; each replica evaluates its share of the evaluation batches.
- gather / scatter: rank 0 assembles the whole model's arrays, optimizer state (in the whole model's parameter
  order) and carried state (the model's own, from its blocks' states), so `disttrain eval`, local runs and
  resumes in any layout load it.
"""
import json
import math

import numpy as np

from disttrain import trace
from disttrain.autograd.grad_mode import no_grad
from disttrain.models import protocol
from disttrain.nn.utils import clip_grad_norm_, grad_norm
from disttrain.parallel.comm import world
from disttrain.parallel.data_parallel import broadcast_tensors
from disttrain.parallel.mpi_mode import MPIMode, ranks
from disttrain.parallel.pipeline.blocks import UncuttableModelError, blocks_of
from disttrain.parallel.pipeline.rank_layout import PipelineLayoutError, check_layout
from disttrain.parallel.pipeline.p2p import StageLink
from disttrain.parallel.pipeline.partition import CutError, Partition, partition
from disttrain.parallel.pipeline.runtime import PipelineRuntime, split_micro_batches
from disttrain.parallel.pipeline.schedule import max_in_flight, stage_actions
from disttrain.parallel.pipeline.stage_memory import stage_holding, stage_step_bytes
from disttrain.tensor import memory
from disttrain.tensor.creation import tensor
from disttrain.train import saving
from disttrain.train.memory_plan import holding_for
from disttrain.train.mode import RunState, describe_threads, make_optimizer

__all__ = ["PipelineMode", "check_enough_blocks", "cut_error", "user_partition"]

_PARAM_TAG = 31000       # full-model gathering for checkpoints (below the pipe's header tag)


class PipelineMode(MPIMode):
    name = "pipeline"

    def __init__(self, comm=None, stages=2, micro_batches=1, schedule="1f1b", split_points=None,
                 checkpointing=False, source=None):
        self.comm = comm if comm is not None else world()
        check_layout(self.comm.size, stages, micro_batches, source=source)
        self.stages, self.replicas = stages, self.comm.size // stages
        self.stage, self.replica = self.comm.rank % stages, self.comm.rank // stages
        self.micro_batches, self.schedule, self.split_points = micro_batches, schedule, split_points
        self.checkpointing = checkpointing
        self.source = source                  # the job file, named in errors
        self.pipe = self.comm.Split(color=self.replica, key=self.stage)
        self.stage_group = self.data_group = self.comm.Split(color=self.stage, key=self.replica)
        self.partition = self.full_model = self.runtime = self.link = None
        self.step_memory = None               # this stage's measured step memory (stage_memory.py), from prepare
        self.batch_axis = 1
        self._blocks = []                     # [(name, None)] of the whole model, for its state protocol
        self._gradients = (True, True)        # whether this stage's input, and its output, need gradients
        self._model_parameters = None
        self._eval_runtimes = {}

    @classmethod
    def from_spec(cls, spec, comm=None):
        p = spec.parallel
        return cls(comm, stages=p.stages, micro_batches=p.micro_batches, schedule=p.schedule,
                   split_points=p.split_points, checkpointing=p.stage_checkpointing, source=spec.source)

    # ---- the model -------------------------------------------------------------------------------
    def prepare(self, model, optimizer, data=None):
        """This rank's Stage of `model` and an optimizer over its parameters."""
        self.full_model = model
        self.batch_axis = data.batch_axis if data is not None else 1
        self._model_parameters = sum(p.numel() for p in model.parameters())
        check_enough_blocks(model, self.stages, self.source)   # every rank, before rank 0 alone balances the cut
        if self.split_points is not None:
            self.partition = user_partition(model, self.stages, self.split_points, self.source)
        else:
            self.partition = self._broadcast_partition(model, data)
        self._blocks = [(name, None) for name in self.partition.block_names]
        _check_every_stage_has_parameters(model, self.partition, self.source)   # every rank: all stop alike
        self.model = self.partition.build_stage(model, self.stage)
        xp = _array_module(model)
        self.step_memory = self._measure_step_memory(model, data)
        self._gradients = (self.partition.input_needs_gradient(model, self.stage),
                           self.stage < self.stages - 1 and self.partition.input_needs_gradient(model, self.stage + 1))
        _release_other_stages(model, self.model)
        self.link = StageLink(self.pipe, self.stage, self.stages, xp=xp)
        self.runtime = self._runtime(self.micro_batches, self.schedule)
        return self.model, make_optimizer(optimizer, self.model.parameters())

    def _broadcast_partition(self, model, data):
        """Rank 0's balanced cut on every rank, or, on every rank, the PipelineLayoutError it met."""
        layout = error = None
        if self.comm.rank == 0:
            try:
                layout = self._balanced_partition(model, data).to_dict()
            except CutError as exc:
                error = str(cut_error(exc, self.stages, None, self.source))
        layout, error = self.comm.bcast_object((layout, error), root=0, what="broadcast of the partition")
        if error is not None:
            raise PipelineLayoutError(error)
        return Partition.from_dict(layout)

    def _balanced_partition(self, model, data):
        """Rank 0's cut balancing a profile of one micro-batch of this replica's first training batch."""
        if self.stages == 1 or data is None:
            return partition(model, None, self.stages)
        inputs, targets = next(iter(data.train_batches(self.train_share())))
        inputs, targets = (split_micro_batches(a, self.micro_batches, self.batch_axis)[0] for a in (inputs, targets))
        device = self.device_of(model)
        with_loss = lambda output: protocol.output_loss(model, output, tensor(targets, device=device))  # noqa: E731
        return partition(model, tensor(inputs, device=device), self.stages, repeats=3, statistic="min",
                         loss_fn=with_loss)

    def _measure_step_memory(self, model, data):
        """This stage's StageStepMemory for the first training batch (None without data). A cut that does not
        carry one Tensor is met by the ranks either side of it: all ranks agree on it and raise it alike."""
        if data is None:
            return None
        inputs, targets = next(iter(data.train_batches(self.train_share())))
        loss_fn = lambda output, y: protocol.output_loss(model, output, tensor(y, device=self.device_of(model)))  # noqa: E731
        step = error = None
        try:
            step = stage_step_bytes(model, self.partition, self.stage, inputs, targets, loss_fn, self.schedule,
                                    self.micro_batches, self.batch_axis, self.replicas, self.checkpointing,
                                    self.device_of(model))
        except CutError as exc:
            error = str(cut_error(exc, self.stages, self.split_points, self.source))
        errors = [e for e in self.comm.allgather_object(error, what="agreement on the stages' cuts") if e]
        if errors:
            raise PipelineLayoutError(errors[0])
        return step

    @staticmethod
    def device_of(model):
        params = list(model.parameters())
        return params[0].device if params else "cpu"

    def _runtime(self, micro_batches, schedule):
        input_gradient, output_gradient = self._gradients
        return PipelineRuntime(self.model, self.link, schedule=schedule, micro_batches=micro_batches,
                               batch_axis=self.batch_axis, checkpointing=self.checkpointing, device=self.device,
                               input_gradient=input_gradient, output_gradient=output_gradient)

    def _loss_fn(self, output, targets):
        return protocol.output_loss(self.full_model, output, tensor(targets, device=self.device))

    # ---- one step --------------------------------------------------------------------------------
    def forward_backward(self, inputs, targets, state=None, backward_scale=1.0):
        result = self.runtime.step(inputs, targets, self._loss_fn, state, backward_scale=backward_scale)
        self._average_over_replicas()
        self._sync_buffers()
        return self._broadcast_loss(result.loss), result.states

    def forward_only(self, inputs, targets, state=None):
        runtime = self._eval_runtime(inputs.shape[self.batch_axis])
        result = runtime.forward_only(inputs, targets, self._loss_fn, state)
        return self._broadcast_loss(result.loss), result.states

    def _eval_runtime(self, batch):
        """A forward-only runtime for evaluation batches: the most micro-batches <= the job's that divide it."""
        micro = max(m for m in range(1, self.micro_batches + 1) if batch % m == 0)
        if micro not in self._eval_runtimes:
            self._eval_runtimes[micro] = self._runtime(micro, "gpipe")
        return self._eval_runtimes[micro]

    def _broadcast_loss(self, loss):
        """The last stage's loss on every stage of the pipe (one 8-byte Bcast)."""
        buf = np.array([loss if loss is not None else 0.0], dtype=np.float64)
        with trace.span("broadcast loss", lane="comm"):
            self.pipe.Bcast(buf, root=self.stages - 1, what="broadcast of the loss from the last stage")
        return float(buf[0])

    def _average_over_replicas(self):
        """Every gradient the mean over the D replicas of this stage (nothing to do for one replica)."""
        if self.replicas == 1:
            return
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        with trace.span("stage allreduce", lane="comm"):
            for dtype in sorted({g.dtype for g in grads}, key=str):
                same = [g for g in grads if g.dtype == dtype]
                arrays, kernels, xp = [g.data for g in same], same[0].backend.kernels, same[0].backend.xp
                flat = kernels.bucket_pack(xp, arrays)
                memory.count(flat)
                self.stage_group.Allreduce(flat, what=f"allreduce of stage {self.stage}'s gradients")
                kernels.bucket_unpack(xp, flat, arrays, scale=1.0 / self.replicas)

    def _sync_buffers(self):
        """Every replica of this stage takes the first replica's buffers (running statistics each replica updates
        from its own share), as data-parallel ranks take rank 0's: evaluation, sharded over the replicas, then
        uses the buffers rank 0's checkpoint holds."""
        buffers = [b for b in self.model.buffers() if b is not None]
        if self.replicas > 1 and buffers:
            broadcast_tensors(self.stage_group, buffers, what=f"broadcast of stage {self.stage}'s buffers")

    def clip_grad_norm(self, params, max_norm):
        """Clip by the norm of all stages' gradients together; returns that norm before clipping."""
        grads = [p.grad for p in params if p.grad is not None]
        local = grad_norm(grads) if grads else 0.0
        squares = np.array([local * local], dtype=np.float64)
        self.pipe.Allreduce(squares, what="allreduce of the squared gradient norm")
        total = math.sqrt(float(squares[0]))
        return clip_grad_norm_(params, max_norm, total_norm=total)

    # ---- job checkpoints: the whole model on rank 0 ----------------------------------------------
    def gather(self, local):
        """The whole model's RunState on rank 0 (None elsewhere); a collective over all ranks."""
        block_arrays = self._gather_block_states(local.carried)   # every replica takes part (stage allgather)
        local_index = {name: i for i, (name, _) in enumerate(self.model.named_parameters())}
        full_names = [name for name, _ in self.full_model.named_parameters()]
        state = local.optimizer
        _one_group(state)
        to_full = {local_index[name]: j for j, name in enumerate(full_names) if name in local_index}
        arrays, scalars = saving.split_optimizer_state(
            {"state": {to_full[i]: entry for i, entry in state["state"].items()}, "param_groups": []})
        arrays.update({f"model.{name}": a for name, a in local.model.items()})
        arrays.update(block_arrays)
        merged = self._gather_to_main(arrays, scalars["state"])
        if merged is None:
            return None
        arrays, scalar_state = merged
        model = {name[len("model."):]: a for name, a in arrays.items() if name.startswith("model.")}
        group = dict(state["param_groups"][0], params=list(range(len(full_names))))
        optimizer_state = saving.join_optimizer_state(arrays, {"state": scalar_state, "param_groups": [group]})
        return RunState(model, optimizer_state, self._model_state(arrays))

    def _gather_block_states(self, states):
        """This stage's carried block states, every micro-batch's and replica's streams side by side, as arrays
        named "state.<block>..." (empty when the stage carries none)."""
        if states is None:
            return {}
        out = {}
        for i, (name, block) in enumerate(zip(self.model.block_names, self.model.blocks)):
            per_micro = [s[i] for s in states]
            if all(s is None for s in per_micro):
                continue
            replica_state = protocol.join_state(block, per_micro)
            out.update(protocol.state_to_arrays(self.gather_streams(replica_state, block), prefix=f"state.{name}"))
        return out

    def _model_state(self, arrays):
        """The whole model's carried state from every block's ("state.<block>..." arrays), or None."""
        per_block = [protocol.state_from_arrays(arrays, prefix=f"state.{name}") for name, _ in self._blocks]
        return protocol.state_from_blocks(self.full_model, self._blocks, per_block)

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

    def scatter(self, whole):
        """This stage's entries of a whole-model RunState, its carried state cut to this replica's streams and
        the micro-batches."""
        mine = list(self.model.state_dict())
        missing = [name for name in mine if name not in whole.model]
        if missing:
            raise ValueError(f"missing entries for pipeline stage {self.stage}: {missing}")
        model = {name: whole.model[name] for name in mine}
        optimizer = self._stage_optimizer_state(whole.optimizer) if whole.optimizer else whole.optimizer
        return RunState(model, optimizer, self._stage_states(whole.carried))

    def _stage_optimizer_state(self, state):
        """The whole-model optimizer state cut to this stage's parameters."""
        _one_group(state)
        full_index = {name: j for j, (name, _) in enumerate(self.full_model.named_parameters())}
        mine = [full_index[name] for name, _ in self.model.named_parameters()]
        group = dict(state["param_groups"][0], params=list(range(len(mine))))
        return {"state": {i: state["state"][j] for i, j in enumerate(mine) if j in state["state"]},
                "param_groups": [group]}

    def _stage_states(self, model_state):
        """The model's carried state as this stage's per-micro-batch lists of per-block states (None: zeros)."""
        if model_state is None:
            return None
        with no_grad():
            per_block = dict(zip([n for n, _ in self._blocks],
                                 protocol.block_states(self.full_model, self._blocks, model_state)))
        states = [[] for _ in range(self.micro_batches)]
        for name, block in zip(self.model.block_names, self.model.blocks):
            state = per_block.get(name)
            if state is not None:
                state = self.share_of_streams(state, block)
            pieces = protocol.split_state(block, state, self.micro_batches)
            for m, s in enumerate(states):
                s.append(_on_device(pieces[m], self.device))
        return states

    # ---- reporting -------------------------------------------------------------------------------------
    def parameter_count(self):
        """The whole model's parameters (every stage's), not this rank's stage's."""
        return self._model_parameters

    def memory_holding(self):
        """This stage's step as measured on two micro-batches at prepare and replayed over its schedule
        (stage_memory.py: activations of the micro-batches in flight, gradients, receive buffers, what is sent);
        before prepare, or without data, its blocks' activations of a micro-batch (from the balancing profile;
        unknown under split_points) times the micro-batches its schedule keeps in flight."""
        if self.step_memory is not None:
            return stage_holding(self.stage, self.step_memory)
        in_flight = max_in_flight(stage_actions(self.schedule, self.stages, self.micro_batches, self.stage))
        profiled = None if self.partition is None else self.partition.stage_activation_bytes(self.stage)
        return holding_for("pipeline", stage_activation_bytes=profiled, in_flight=in_flight, stage=self.stage)

    def describe(self, batch_size, unit="streams"):
        share = batch_size // self.replicas
        recompute = ", stage checkpointing" if self.checkpointing else ""
        return [f"pipeline: {ranks(self.comm.size)} ({self.ranks_on_this_node()} on this node) = {self.stages} "
                f"stages x {self.replicas} replica{'s' if self.replicas > 1 else ''}, {share} of the batch's "
                f"{batch_size} {unit} per replica in {self.micro_batches} micro-batches of {share // self.micro_batches}, "
                f"schedule {self.schedule}{recompute}, {describe_threads(self.device)} per rank; {self.waits()}",
                *self.partition.describe().splitlines()]


def _on_device(state, device):
    """A carried state copied into arrays of its own (split_state gives views) on `device`."""
    if state is None:
        return None
    return protocol.state_from_arrays(protocol.state_to_arrays(state), device=device)


def _release_other_stages(model, stage):
    """Free the arrays of the parameters other stages own: this rank only ever reads its stage's, and the
    whole model's names (all that the checkpoint code needs of it) stay."""
    mine = {id(p) for p in stage.parameters()}
    for p in model.parameters():
        if id(p) not in mine:
            p.data = p.backend.xp.empty((0,) * p.data.ndim, dtype=p.data.dtype)     # not a view: frees
            p.grad = None


def _check_every_stage_has_parameters(model, cut, source):
    """PipelineLayoutError naming the first stage of `cut` that holds no parameters (it would have nothing for
    its optimizer and no device to run on)."""
    for k in range(cut.stages):
        stage = cut.build_stage(model, k)
        if not list(stage.parameters()):
            raise PipelineLayoutError(f"{source or '<job>'}: pipeline stage {k} of {cut.stages} holds no parameters "
                                      f"(blocks {', '.join(stage.block_names)}); choose fewer stages, or split points "
                                      "that give every stage a block with parameters")


def _one_group(state):
    if len(state["param_groups"]) != 1:
        raise ValueError(f"pipeline checkpoints support optimizers with one parameter group, got "
                         f"{len(state['param_groups'])}")


def _array_module(model):
    params = list(model.parameters())
    return params[0].backend.xp if params else np


def check_enough_blocks(model, stages, source=None):
    """PipelineLayoutError unless the model cuts into blocks (an nn.Sequential, or pipeline_blocks()), one for
    each of `stages` stages, and a recurrent one maps its state to its blocks' and back (`source`: the job,
    named)."""
    try:
        names = [name for name, _ in blocks_of(model)]
    except UncuttableModelError:
        raise PipelineLayoutError(f'{source or "<job>"}: [parallel] mode = "pipeline" cuts the model into blocks, '
                                  f"but a {type(model).__name__} is neither an nn.Sequential nor defines "
                                  "pipeline_blocks(); make it an nn.Sequential, or give it pipeline_blocks() "
                                  "returning [(name, Block), ...] with Block.forward(x, state=None) -> (y, state) "
                                  "(disttrain.parallel.pipeline.blocks.ModuleBlock(name, module) wraps a stateless "
                                  "module)") from None
    missing = [name for name in ("block_states", "state_from_blocks") if not hasattr(model, name)]
    if protocol.carries_state(model) and missing:       # else the first checkpoint, after training, would fail
        raise PipelineLayoutError(f'{source or "<job>"}: [parallel] mode = "pipeline": {type(model).__name__} carries '
                                  f"a state (carries_state = True) but defines no {' or '.join(missing)}; a "
                                  "pipeline gives each block its part of the state and joins them for checkpoints: "
                                  "define block_states(state) -> {block name: state} and state_from_blocks({block "
                                  "name: state}) -> state (disttrain/models/protocol.py)")
    if stages > len(names):
        raise PipelineLayoutError(f"{source or '<job>'}: [parallel] stages = {stages}, but the model has "
                                  f"{len(names)} blocks ({', '.join(names)}) and every stage needs at least one; "
                                  f"choose at most {len(names)} stages")


def user_partition(model, stages, split_points, source=None):
    """The cut at the job's split_points (no profile: the same on every rank), or PipelineLayoutError."""
    try:
        return partition(model, None, stages, split_points=split_points)
    except (ValueError, TypeError) as exc:
        raise cut_error(exc, stages, split_points, source) from None


def cut_error(exc, stages, split_points, source=None):
    """The PipelineLayoutError saying that `exc` (a ValueError of the cut) came from the job's [parallel] stages
    (the balancer's cut: split_points None) or its split_points."""
    said = str(exc).removeprefix("split_points: ").removeprefix("partition: ")
    given = (f"[parallel] stages = {stages}" if split_points is None else
             f"[parallel] split_points = {json.dumps(split_points)} with stages = {stages}")
    return PipelineLayoutError(f"{source or '<job>'}: {given}: {said}")
