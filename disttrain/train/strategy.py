"""How a training step is distributed: the seam where data-parallel, pipeline and parameter-server modes plug in.

The Trainer calls a strategy at fixed points of every step and otherwise does not know how many processes
take part:

    streams = strategy.shard(streams)          # this process's columns of the (N, B) train streams
    ... forward, loss, backward ...
    strategy.sync_gradients(params)            # e.g. wait for the bucketed allreduces of the gradients
    ... clip, optimizer step ...
    value = strategy.reduce_mean(value)        # a float metric averaged over processes
    if strategy.any(stop_requested): ...       # every process stops after the same step
    streams = strategy.shard_eval(streams)     # evaluation: each process its columns, sums via reduce_sum
    if strategy.is_main: log, plot, write checkpoints

LocalStrategy is the one-process mode: every call is the identity.
"""

__all__ = ["LocalStrategy"]


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

    def shard_batch(self, array, axis=1):
        """This process's share of a per-stream array of the global batch (here: all of it)."""
        return array

    def barrier(self):
        """Wait until every process gets here."""
