"""How a training step is distributed: the seam where data-parallel, pipeline and parameter-server modes plug in.

The Trainer calls a strategy at fixed points of every step and otherwise does not know how many processes
take part:

    model = strategy.prepare_model(model)      # what this process trains (pipeline: its stage)
    streams = strategy.shard(streams)          # this process's columns of the (N, B) train streams
    loss, hidden = strategy.forward_backward(trainer, inputs, targets)
    strategy.sync_gradients(params)            # e.g. wait for the bucketed allreduces of the gradients
    norm = strategy.clip_grad_norm(params, max_norm)    # then the optimizer step
    value = strategy.reduce_mean(value)        # a float metric averaged over processes
    if strategy.any(stop_requested): ...       # every process stops after the same step
    streams = strategy.shard_eval(streams)     # evaluation: each process its columns, sums via reduce_sum
    if strategy.is_main: log, plot, write checkpoints
    for line in strategy.messages(): ...       # e.g. what overlap="auto" chose
    strategy.describe(spec), strategy.parameter_count(model)   # for the job log at start

LocalStrategy is the one-process mode: every call is the identity. Every other strategy subclasses it:
data parallelism and the parameter server keep its `prepare_model`, `forward_backward`, `clip_grad_norm`,
`eval_segment` and checkpoint hooks (today's one-process code); only a strategy that splits the model itself
(pipeline) replaces them.
"""
import disttrain as dt
from disttrain.nn.utils import clip_grad_norm_
from disttrain.tensor.threads import get_num_threads

__all__ = ["LocalStrategy", "describe_threads"]


class LocalStrategy:
    """One process, one device: nothing to shard, synchronise or reduce."""

    name = "local"
    rank = 0
    world_size = 1
    is_main = True

    def shard(self, streams):
        """This process's share of the (N, B) stream columns."""
        return streams

    def sync_gradients(self, params):
        """Make every parameter's .grad the gradient of the global batch (here it already is)."""

    def reduce_mean(self, value):
        """The mean of a float over all processes."""
        return value

    def reduce_sum(self, values):
        """Element-wise sums of a sequence of floats over all processes."""
        return list(values)

    def any(self, flag):
        """True on every process when `flag` is true on some process (e.g. a stop request seen by one)."""
        return bool(flag)

    def shard_eval(self, streams):
        """This process's columns of the (N, B) evaluation streams (possibly none); results go through reduce_sum."""
        return streams

    def gather_batch(self, array, axis=1):
        """Every process's share of a per-stream array side by side (here: the array itself)."""
        return array

    def messages(self):
        """Lines for the job log that the strategy has to say since the last call (the main process prints them)."""
        return []

    def describe(self, spec):
        """Lines for the job log at start: how many processes train, on what share of the batch, with how many
        BLAS threads."""
        return [f"local: 1 process, {spec.data.batch_size} streams a batch, {describe_threads(spec)}"]

    def parameter_count(self, model):
        """The whole model's number of parameters (model: what prepare_model returned)."""
        return sum(p.numel() for p in model.parameters())

    def shard_batch(self, array, axis=1):
        """This process's share of a per-stream array of the global batch (here: all of it)."""
        return array

    def barrier(self):
        """Wait until every process gets here."""

    # ---- the model and the step (pipeline mode replaces these) ---------------------------------
    def prepare_model(self, model):
        """The module this process trains (before the optimizer is built): here the whole model."""
        return model

    def forward_backward(self, trainer, inputs, targets):
        """Forward and backward of one segment: (mean loss as a float, carried state for the next segment)."""
        return trainer.forward_backward(inputs, targets)

    def clip_grad_norm(self, params, max_norm):
        """Clip the global gradient norm to max_norm; returns the norm before clipping."""
        return clip_grad_norm_(params, max_norm)

    def eval_segment(self, trainer, inputs, targets, hidden):
        """(mean loss as a float, state) of one evaluation segment under no_grad."""
        return trainer.eval_segment(inputs, targets, hidden)

    # ---- job checkpoints (pipeline mode replaces these) -----------------------------------------
    def gather_checkpoint(self, trainer):
        """(carried (h, c) of every stream as NumPy or None, the whole model's arrays or None = the trainer's,
        the whole optimizer state or None = the trainer's), on the main process; a collective."""
        if trainer.hidden is None:
            return None, None, None
        return tuple(self.gather_batch(t.numpy()) for t in trainer.hidden), None, None

    def load_model_state(self, model, state):
        """Load a whole model's state_dict (arrays by name) into this process's model."""
        model.load_state_dict(state)

    def load_optimizer_state(self, optimizer, state):
        """Load a whole-model optimizer state_dict into this process's optimizer."""
        optimizer.load_state_dict(state)

    def shard_hidden(self, trainer, h, c):
        """The carried state to continue from, given the checkpoint's (h, c) of every stream (None: zeros)."""
        if h is None:
            return None
        return tuple(dt.tensor(self.shard_batch(a), device=trainer.device) for a in (h, c))


def describe_threads(spec):
    """The BLAS threads of each process, in words (a GPU job: its device instead)."""
    if spec.train.device != "cpu":
        return f"device {spec.train.device}"
    n = get_num_threads()
    return f"{n} BLAS thread{'s' if n > 1 else ''}"
