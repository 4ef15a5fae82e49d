"""MPIMode: what the MPI modes (data parallel, pipeline) share of the mode interface (disttrain/train/mode.py).

`comm` holds every rank; `data_group` the ranks that split each batch between them (data parallelism: all;
a pipeline: the same stage of every replica). Rank 0 is the main one: it logs and writes checkpoints.
"""
import numpy as np

from disttrain import trace
from disttrain.data.source import Share
from disttrain.models import protocol
from disttrain.parallel.comm import any_rank
from disttrain.parallel.mpi_job import local_size
from disttrain.train.mode import Mode

__all__ = ["MPIMode"]


class MPIMode(Mode):
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

    def train_share(self):
        return Share(self.data_group.rank, self.data_group.size)

    def eval_share(self):
        return Share(self.data_group.rank, self.data_group.size)

    def reduce(self, values, op="sum"):
        """Sums or means of floats over the data group (one Allreduce of float64s)."""
        buf = np.array(values, dtype=np.float64)
        what = "allreduce of a logged metric" if op == "mean" else "allreduce of evaluation sums"
        self.data_group.Allreduce(buf, what=what)
        if op == "mean":
            buf /= self.data_group.size
        return buf.tolist()

    def agree(self, flag):
        """True on every rank when `flag` is true on some rank (one 4-byte Allreduce over all ranks)."""
        return any_rank(self.comm, flag)

    def gather_streams(self, state, model):
        """Every data share's carried state side by side along its streams (`model`'s protocol says where they
        are), on every rank of the data group: the whole batch's state, for a job checkpoint. A collective."""
        if state is None:
            return None
        arrays = protocol.state_to_arrays(state)
        tables = {name: self.data_group.Allgather(np.ascontiguousarray(a), what="allgather of the carried state")
                  for name, a in arrays.items()}
        shares = [protocol.state_from_arrays({name: table[r] for name, table in tables.items()})
                  for r in range(self.data_group.size)]
        return protocol.join_state(model, shares)

    def share_of_streams(self, state, model):
        """This rank's share of a whole batch's carried state (gather_streams' inverse)."""
        if state is None:
            return None
        share = protocol.split_state(model, state, self.data_group.size)[self.data_group.rank]
        return protocol.state_from_arrays(protocol.state_to_arrays(share), device=self.device)

    def waits(self):
        """How long a rank waits for the others, in words."""
        timeout = self.comm.watchdog.timeout_s if self.comm.watchdog is not None else None
        return ("no bound on waits" if timeout is None else
                f"a rank waits at most {timeout:g} s for the others ([parallel] timeout_s)")

    def barrier(self):
        """Wait until every rank gets here."""
        with trace.span("barrier"):
            self.comm.Barrier(what="barrier")

    def ranks_on_this_node(self):
        return local_size()


def ranks(n):
    return f"{n} rank{'s' if n != 1 else ''}"
