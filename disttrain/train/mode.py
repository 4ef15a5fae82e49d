"""The mode interface: how one training run is spread over processes.

The Trainer calls a mode at fixed points and never the other way round; a mode never reads or writes the
Trainer. Every mode implements these, grouped by what they cover:

    preparing       module, optimizer = mode.prepare(model, optimizer, data)
                        what this process trains (a pipeline stage; the model itself elsewhere) and its
                        optimizer; `optimizer` is an Optimizer over model's parameters or a factory
                        params -> Optimizer (a pipeline rebuilds it over its stage's parameters); `data`,
                        the data source, for a mode that needs a sample batch or the batch axis
    data            mode.train_share(), mode.eval_share() -> Share (or None: this process does not evaluate)
    the step        loss, state = mode.forward_backward(inputs, targets, state, backward_scale)
                        after it every .grad holds the whole batch's gradient on this process's
                        parameters (data: averaged over ranks while backward runs; pipeline: streamed
                        through the stages, averaged over replicas)
                    loss, state = mode.forward_only(inputs, targets, state)        (evaluation)
    gradients       norm = mode.clip_grad_norm(params, max_norm)   the global norm, before clipping
                    mode.step(optimizer, epoch) the update: optimizer.step(), or (parameter server) push the
                                                gradients and install the parameters the servers send back
                    mode.learning_rate(optimizer)   the lr the update uses (for the logs)
    reductions      mode.reduce(values, op)     sums or means of floats over the data shares
    starting and    mode.start(epoch)           training begins or resumes at `epoch` (e.g. join the servers)
    stopping        mode.agree(flag)            True on every process when some process says True
                    mode.finish()               after the last step (e.g. await the last push)
    checkpoints     whole = mode.gather(local)  RunState of the whole model on the main process (else None)
                    local = mode.scatter(whole) this process's part of a whole-model RunState
                    mode.checkpoint_dir(out)    where this process writes its job checkpoint (or None)
    random numbers  mode.rank                   which process of the job this is: its training steps draw
                                                their own stream (dropout masks; tensor/random.step_stream)
    reporting       mode.is_main, mode.describe(), mode.messages(), mode.parameter_count()
                    mode.memory_holding()       how this process holds its memory: its share of the
                                                gradients and optimizer state (train/memory_plan.Holding)
                    mode.resident_buffers()     arrays it keeps between steps that no tensor holds, which
                                                the step's MemoryMeter counts

LocalMode is the one-process mode: every reduction is the identity. Data-parallel, pipeline and
parameter-server modes live beside their machinery (disttrain/parallel/data_mode.py,
parallel/pipeline/pipeline_mode.py, paramserver/worker_mode.py); `disttrain.parallel.mpi_job.mode_for` builds
the MPI ones from a job, `disttrain.paramserver.job` a worker's.
"""
from dataclasses import dataclass
from pathlib import Path

import disttrain as dt
from disttrain import trace
from disttrain.data.source import WHOLE
from disttrain.models import protocol
from disttrain.nn.utils import clip_grad_norm_
from disttrain.tensor.threads import get_num_threads
from disttrain.train.memory_plan import Holding

__all__ = ["Mode", "LocalMode", "RunState", "make_optimizer"]


@dataclass
class RunState:
    """What a job checkpoint holds of the model: parameters and buffers by name (NumPy), the optimizer's
    state_dict, and the carried state (a nest of Tensors, or None)."""
    model: dict
    optimizer: dict
    carried: object = None


def make_optimizer(optimizer, params):
    """`optimizer` over `params`: a factory is called; an Optimizer over other parameters is rebuilt as the
    same class with its defaults (one param group)."""
    if not hasattr(optimizer, "param_groups"):
        if not callable(optimizer):
            raise TypeError(f"optimizer must be an Optimizer or a factory params -> Optimizer, not {optimizer!r}")
        return optimizer(list(params))
    if len(optimizer.param_groups) != 1:
        raise ValueError(f"cannot rebuild a {type(optimizer).__name__} with {len(optimizer.param_groups)} param "
                         "groups over another module's parameters; pass a factory params -> optimizer")
    return type(optimizer)(list(params), **optimizer.defaults)


class Mode:
    """The interface, with the one-process answers (the identity everywhere); every mode subclasses it."""

    name = "local"
    rank = 0
    world_size = 1          # data shares each batch is cut into
    is_main = True          # logs, metrics and curves come from the main process

    model = None            # what prepare() returned

    # ---- preparing ---------------------------------------------------------------------------------
    def prepare(self, model, optimizer, data=None):
        """(the module this process trains, its optimizer)."""
        self.model = model
        if not hasattr(optimizer, "param_groups"):
            optimizer = make_optimizer(optimizer, model.parameters())
        return model, optimizer

    @property
    def device(self):
        params = list(self.model.parameters()) if self.model is not None else []
        return params[0].device if params else "cpu"

    # ---- data ----------------------------------------------------------------------------------------
    def train_share(self):
        return WHOLE

    def eval_share(self):
        return WHOLE

    # ---- the step ------------------------------------------------------------------------------------
    def forward_backward(self, inputs, targets, state=None, backward_scale=1.0):
        """Forward from the carried state, the loss, backward of loss x backward_scale -> (loss, new state)."""
        x, y = (dt.tensor(a, device=self.device) for a in (inputs, targets))
        with trace.span("forward"):
            loss, state = protocol.forward_loss(self.model, x, y, state)
        with trace.span("backward"):
            (loss * backward_scale if backward_scale != 1.0 else loss).backward()
        return loss.item(), protocol.detach_state(self.model, state)

    def forward_only(self, inputs, targets, state=None):
        """(loss, new state) of one evaluation batch (called under no_grad)."""
        x, y = (dt.tensor(a, device=self.device) for a in (inputs, targets))
        loss, state = protocol.forward_loss(self.model, x, y, state)
        return loss.item(), state

    # ---- gradients and the update ----------------------------------------------------------------------
    def clip_grad_norm(self, params, max_norm):
        """Clip the global gradient norm to max_norm; returns the norm before clipping."""
        return clip_grad_norm_(params, max_norm)

    def step(self, optimizer, epoch=0):
        """Apply this step's gradients (epoch: the epoch the step belongs to, 0-based)."""
        optimizer.step()

    def learning_rate(self, optimizer):
        """The lr the next update uses."""
        return optimizer.param_groups[0]["lr"]

    # ---- reductions and agreement --------------------------------------------------------------------
    def reduce(self, values, op="sum"):
        """Element-wise sums ("sum") or means ("mean") of floats over the data shares."""
        return [float(v) for v in values]

    def agree(self, flag):
        """True on every process when `flag` is true on some process (a stop request seen by one)."""
        return bool(flag)

    def start(self, epoch):
        """Called when fit() begins, after a restore: training continues at `epoch` (0-based)."""

    def finish(self):
        """Called once after the last training step, before the final evaluation."""

    # ---- checkpoints -----------------------------------------------------------------------------------
    def gather(self, local):
        """The whole model's RunState on the main process, None elsewhere; a collective."""
        return local

    def scatter(self, whole):
        """This process's part of a whole-model RunState."""
        return whole

    def checkpoint_dir(self, out_dir):
        """Where this process writes its job checkpoints (None: it writes none)."""
        return Path(out_dir) if out_dir is not None and self.is_main else None

    def checkpoint_record(self):
        """What the mode adds to a checkpoint's trainer.json as "mode" (JSON; None: nothing), for those who
        judge the checkpoint later; restoring does not read it."""
        return None

    # ---- reporting -------------------------------------------------------------------------------------
    def parameter_count(self):
        """The whole model's number of parameters."""
        return sum(p.numel() for p in self.model.parameters())

    def memory_holding(self):
        """What this process holds of the memory of what it trains, for the memory estimate (after prepare)."""
        return Holding()

    def resident_buffers(self):
        """Arrays this mode keeps from step to step that no tensor holds (communication buffers), for the
        memory meter (after prepare)."""
        return []

    def describe(self, batch_size, unit="streams"):
        """Lines for the job log at start: processes, their share of a batch of `batch_size` `unit`, threads."""
        return [f"local: 1 process, {batch_size} {unit} a batch, {describe_threads(self.device)}"]

    def messages(self):
        """Lines for the job log since the last call (the main process prints them)."""
        return []

    def close(self):
        """Release what prepare() set up (threads, callbacks, connections)."""


class LocalMode(Mode):
    """One process, one device (CPU or one GPU): the debugging mode."""


def describe_threads(device):
    """The BLAS threads of each process, in words (a GPU: its device instead)."""
    if device != "cpu":
        return f"device {device}"
    n = get_num_threads()
    return f"{n} BLAS thread{'s' if n > 1 else ''}"
