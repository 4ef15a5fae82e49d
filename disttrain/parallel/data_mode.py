"""DataParallelMode: the mode interface (disttrain/train/mode.py) over MPI data parallelism.

    mode = DataParallelMode(bucket_mb=25)               # under mpirun -n N
    trainer = Trainer(model, data, optimizer, mode=mode)

Every rank runs the same Trainer on its share of every batch (`train_share`: rank r of N), so the N shares
side by side are the one-process batch. `prepare` wraps the model's parameters in DataParallel: it checks
that every rank holds the same model, broadcasts rank 0's weights and registers the gradient buckets, whose
allreduces run while backward does; when `forward_backward` returns every .grad is the mean over the ranks,
i.e. the gradient of the loss over the whole batch. Rank 0 is the main process (logs, checkpoints); the
carried state of every rank's streams is gathered for its checkpoints.
"""
from disttrain.parallel.comm import world
from disttrain.parallel.data_parallel import DataParallel
from disttrain.parallel.mpi_mode import MPIMode, ranks
from disttrain.train.mode import RunState, describe_threads

__all__ = ["DataParallelMode"]


class DataParallelMode(MPIMode):
    name = "data"

    def __init__(self, comm=None, bucket_mb=25.0, progress="thread", overlap=True):
        self.comm = self.data_group = comm if comm is not None else world()
        self.bucket_mb, self.progress, self.overlap = bucket_mb, progress, overlap
        self.data_parallel = None
        self._reported_choice = False

    @classmethod
    def from_spec(cls, spec, comm=None):
        return cls(comm, bucket_mb=spec.parallel.bucket_mb, overlap=spec.parallel.overlap)

    def prepare(self, model, optimizer, data=None):
        model, optimizer = super().prepare(model, optimizer, data)
        self.data_parallel = DataParallel(model, self.comm, self.bucket_mb, optimizer=optimizer,
                                          progress=self.progress, overlap=self.overlap)
        return model, optimizer

    def forward_backward(self, inputs, targets, state=None, backward_scale=1.0):
        loss, state = super().forward_backward(inputs, targets, state, backward_scale)
        self.data_parallel.synchronize()
        return loss, state

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

    def describe(self, batch_size, unit="streams"):
        shares = self.data_group.size
        return [f"data parallel: {ranks(self.comm.size)} ({self.ranks_on_this_node()} on this node), "
                f"{batch_size // shares} of the batch's {batch_size} {unit} per rank, {describe_threads(self.device)} "
                f"per rank; {self.waits()}"]

    def close(self):
        if self.data_parallel is not None:
            self.data_parallel.close()
            self.data_parallel = None
