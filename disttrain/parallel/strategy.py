"""DataParallelStrategy: the Trainer's strategy seam (disttrain/train/strategy.py) over MPI data parallelism.

    strategy = DataParallelStrategy(bucket_mb=spec.parallel.bucket_mb)
    trainer = Trainer(spec, out_dir=out, strategy=strategy)
    strategy.attach(trainer.model, trainer.optimizer)   # broadcast + verify now, overlap from the first step

Every rank runs the same Trainer. `shard` gives rank r columns [r*B/N, (r+1)*B/N) of the (rows, B) train
streams, so the N shards of a segment side by side are the one-process segment; `sync_gradients` waits for
the bucketed allreduces started during backward and leaves every .grad the mean over ranks, i.e. the
gradient of the loss over the whole global batch. Rank 0 is the main process (logs, checkpoints).

Without attach(), the first sync_gradients attaches to the parameters it is given (broadcasting rank 0's
values and reducing that step's gradients after backward instead of during it).
"""
import numpy as np

from disttrain.data.batching import shard_streams
from disttrain import trace
from disttrain.parallel.comm import any_rank, world
from disttrain.parallel.data_parallel import DataParallel, broadcast_tensors, verify_same_model
from disttrain.parallel.buckets import Reducer
from disttrain.parallel.launch import local_size
from disttrain.train.strategy import LocalStrategy, describe_threads

__all__ = ["DataParallelStrategy", "MPIStrategy"]


class MPIStrategy(LocalStrategy):
    """What the MPI strategies share. `comm` holds every rank; `data_group` the ranks that split each batch
    between them (data parallelism: all; a pipeline: the same stage of every replica). Rank 0 is the main one.
    """

    comm = data_group = None

    @property
    def rank(self):
        return self.comm.rank

    @property
    def world_size(self):
        """How many shares each batch is cut into."""
        return self.data_group.size

    @property
    def is_main(self):
        return self.comm.rank == 0

    def shard(self, streams):
        """This rank's share (B / world_size columns) of the (rows, B) train streams."""
        return shard_streams(streams, self.data_group.rank, self.data_group.size)

    def shard_eval(self, streams):
        """This rank's near-equal share of the (N, B) evaluation stream columns; B need not divide (the sums
        are token-weighted) and a rank gets none when there are more shares than streams."""
        return streams[:, np.array_split(np.arange(streams.shape[1]), self.data_group.size)[self.data_group.rank]]

    def reduce_mean(self, value):
        """The mean of a float over all ranks (one 8-byte Allreduce)."""
        buf = np.array([value], dtype=np.float64)
        self.comm.Allreduce(buf, what="allreduce of a logged metric")
        return float(buf[0]) / self.comm.size

    def reduce_sum(self, values):
        """Element-wise sums of floats over the data group (token-weighted evaluation: loss sum, token count)."""
        buf = np.array(values, dtype=np.float64)
        self.data_group.Allreduce(buf, what="allreduce of evaluation sums")
        return buf.tolist()

    def any(self, flag):
        """True on every rank when `flag` is true on some rank."""
        return any_rank(self.comm, flag)

    def describe(self, spec):
        batch, shares = spec.data.batch_size, self.data_group.size
        return [f"{self.name} parallel: {_ranks(self.comm.size)} ({local_size()} on this node), "
                f"{batch // shares} of the batch's {batch} streams per rank, {describe_threads(spec)} per rank; "
                f"{self._waits()}"]

    def _waits(self):
        timeout = self.comm.watchdog.timeout_s if self.comm.watchdog is not None else None
        return ("no bound on waits" if timeout is None else
                f"a rank waits at most {timeout:g} s for the others ([parallel] timeout_s)")

    def barrier(self):
        """Wait until every rank gets here."""
        with trace.span("barrier"):
            self.comm.Barrier(what="barrier")


class DataParallelStrategy(MPIStrategy):
    """Data parallelism for the Trainer: same interface as LocalStrategy."""

    name = "data"

    def __init__(self, comm=None, bucket_mb=25.0, progress="thread", overlap=True):
        self.comm = self.data_group = comm if comm is not None else world()
        self.bucket_mb = bucket_mb
        self.progress = progress
        self.overlap = overlap
        self.reducer = None
        self._reported_choice = False

    def attach(self, model, optimizer=None):
        """Verify the model is the same on every rank, broadcast rank 0's weights, register the callbacks."""
        dp = DataParallel(model, self.comm, self.bucket_mb, optimizer=optimizer, progress=self.progress,
                          overlap=self.overlap)
        self._use(dp.reducer)
        return dp

    def _use(self, reducer):
        if self.reducer is not None:
            self.reducer.close()
        self.reducer = reducer

    def messages(self):
        """overlap="auto": the decision, once, when the trial steps have made it."""
        choice = self.reducer.choice if self.reducer is not None else None
        if choice is None or choice.chosen is None or self._reported_choice:
            return []
        self._reported_choice = True
        return [choice.describe()]

    # ---- the Trainer's calls -------------------------------------------------------------------
    def sync_gradients(self, params):
        """Wait for the gradient allreduces; every .grad is then the mean over the ranks."""
        if self.reducer is None:
            named = [(f"params[{i}]", p) for i, p in enumerate(params)]
            verify_same_model(self.comm, named, bucket_mb=self.bucket_mb)
            broadcast_tensors(self.comm, [p for _, p in named])
            self._use(Reducer(named, self.comm, self.bucket_mb, self.progress, overlap=self.overlap))
        self.reducer.synchronize()

    def gather_batch(self, array, axis=1):
        """Every rank's share of a per-stream array side by side along `axis` (a collective; NumPy arrays):
        e.g. the carried LSTM state (layers, B/N, hidden) -> (layers, B, hidden), for a job checkpoint."""
        array = np.ascontiguousarray(array)
        table = self.comm.Allgather(array, what="allgather of the carried state")
        return np.concatenate(list(table), axis=axis)

    def shard_batch(self, array, axis=1):
        """This rank's B/N of a per-stream array of the global batch (the inverse of gather_batch)."""
        width = array.shape[axis] // self.comm.size
        index = [slice(None)] * array.ndim
        index[axis] = slice(self.comm.rank * width, (self.comm.rank + 1) * width)
        return np.ascontiguousarray(array[tuple(index)])

    def close(self):
        if self.reducer is not None:
            self.reducer.close()
            self.reducer = None


def _ranks(n):
    return f"{n} rank{'s' if n != 1 else ''}"
