"""How a training step is distributed: the seam where data-parallel, pipeline and parameter-server modes plug in.

The Trainer calls a strategy at fixed points of every step and otherwise does not know how many processes
take part:

    streams = strategy.shard(streams)          # this process's columns of the (N, B) train streams
    ... forward, loss, backward ...
    strategy.sync_gradients(params)            # e.g. wait for the bucketed allreduces of the gradients
    ... clip, optimizer step ...
    value = strategy.reduce_mean(value)        # a float metric averaged over processes
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

    def gather_batch(self, array, axis=1):
        """Every process's share of a per-stream array side by side (here: the array itself)."""
        return array

    def shard_batch(self, array, axis=1):
        """This process's share of a per-stream array of the global batch (here: all of it)."""
        return array

    def barrier(self):
        """Wait until every process gets here."""
