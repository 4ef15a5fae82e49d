"""DataParallelMode: the mode interface (disttrain/train/mode.py) over MPI data parallelism.

    mode = DataParallelMode(bucket_mb=25)               # under mpirun -n N
    trainer = Trainer(model, data, optimizer, mode=mode)

Every rank runs the same Trainer on its share of every batch (`train_share`: rank r of N), so the N shares
side by side are the one-process batch. `prepare` wraps the model's parameters in DataParallel: it checks
that every rank holds the same model, broadcasts rank 0's weights and registers the gradient buckets, whose
allreduces run while backward does; when backward returns every .grad is the mean over the ranks, i.e. the
gradient of the loss over the whole batch. With shard_optimizer = 1 or 2 (ZeRO, docs/MEMORY.md) the optimizer
is a ShardedOptimizer: each rank keeps and updates its 1/N of the optimizer state and the parameters are
allgathered after the step; with 2 the gradients are reduce-scattered, so a rank holds only its slice of them
and the global norm comes from the slices. Its state_dict is a collective that gathers the whole state, so
checkpoints load at any world size, sharded or not. Rank 0 is the main process (logs, checkpoints); the
carried state of every rank's streams is gathered for its checkpoints.
"""
from functools import partial

from disttrain.parallel.buckets import MAX_ROWS_IN_FLIGHT, bucket_layout
from disttrain.parallel.comm import world
from disttrain.parallel.data_parallel import DataParallel
from disttrain.parallel.mpi_mode import MPIMode, ranks
from disttrain.train.memory_plan import holding_for
from disttrain.train.mode import RunState, describe_threads

__all__ = ["DataParallelMode", "data_parallel_holding"]


def data_parallel_holding(ranks, shard_optimizer, bucket_mb):
    """How one of `ranks` data-parallel ranks holds its memory, for the memory estimate: every gradient in the
    buckets through the step; 1/N of the optimizer state with ZeRO; stage 2: 1/N of the gradients, and the send
    rows of the buckets in flight and the one filling, as the Reducer lays out and keeps them."""
    return holding_for("data", ranks, shard_optimizer, rows_buckets=MAX_ROWS_IN_FLIGHT + 1, bucket_mb=bucket_mb,
                       bucket_layout=partial(bucket_layout, bucket_mb=bucket_mb))


class DataParallelMode(MPIMode):
    name = "data"

    def __init__(self, comm=None, bucket_mb=25.0, progress="thread", overlap=True, shard_optimizer=0):
        self.comm = self.data_group = comm if comm is not None else world()
        self.bucket_mb, self.progress, self.overlap = bucket_mb, progress, overlap
        self.shard_optimizer = shard_optimizer
        self.data_parallel = None
        self._reported_choice = False

    @classmethod
    def from_spec(cls, spec, comm=None):
        p = spec.parallel
        return cls(comm, bucket_mb=p.bucket_mb, overlap=p.overlap, shard_optimizer=p.shard_optimizer)

    def prepare(self, model, optimizer, data=None):
        model, optimizer = super().prepare(model, optimizer, data)
        self.data_parallel = DataParallel(model, self.comm, self.bucket_mb, optimizer=optimizer,
                                          progress=self.progress, overlap=self.overlap,
                                          shard_optimizer=self.shard_optimizer, broadcast_buffers=False)
        return model, self.data_parallel.optimizer

    def forward_backward(self, inputs, targets, state=None, backward_scale=1.0):
        """The step on this rank's share; then every rank takes rank 0's buffers, so evaluation (sharded) and
        the checkpoint (rank 0's) see the same running statistics."""
        result = super().forward_backward(inputs, targets, state, backward_scale)
        self.data_parallel.sync_buffers()
        return result

    def clip_grad_norm(self, params, max_norm):
        """The global norm, clipped; sharded state: from this rank's slices (stage 2 holds no whole gradient)."""
        if self.shard_optimizer:
            return self.data_parallel.optimizer.clip_grad_norm_(max_norm)
        return super().clip_grad_norm(params, max_norm)

    # ---- checkpoints: the model and optimizer are the same on every rank; the carried state is per rank --
    def gather(self, local):
        carried = self.gather_streams(local.carried, self.model)
        return RunState(local.model, local.optimizer, carried) if self.is_main else None

    def scatter(self, whole):
        return RunState(whole.model, whole.optimizer, self.share_of_streams(whole.carried, self.model))

    # ---- reporting -----------------------------------------------------------------------------------
    def messages(self):
        """overlap="auto": the decision, once, when the trial steps have made it."""
        choice = self.data_parallel.reducer.choice if self.data_parallel is not None else None
        if choice is None or choice.chosen is None or self._reported_choice:
            return []
        self._reported_choice = True
        return [choice.describe()]

    def memory_holding(self):
        return data_parallel_holding(self.comm.size, self.shard_optimizer, self.bucket_mb)

    def resident_buffers(self):
        return self.data_parallel.reducer.resident_buffers() if self.data_parallel is not None else []

    def describe(self, batch_size, unit="streams"):
        shares = self.data_group.size
        sharded = (f", optimizer state sharded (ZeRO stage {self.shard_optimizer})" if self.shard_optimizer
                   else "")
        return [f"data parallel: {ranks(self.comm.size)} ({self.ranks_on_this_node()} on this node), "
                f"{batch_size // shares} of the batch's {batch_size} {unit} per rank{sharded}, "
                f"{describe_threads(self.device)} per rank; {self.waits()}"]

    def close(self):
        if self.data_parallel is not None:
            self.data_parallel.close()
            self.data_parallel = None
