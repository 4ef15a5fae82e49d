"""disttrain.parallel: the MPI modes: communicator, data parallelism, sharded optimizer state, pipelines.

    import disttrain.parallel as par
    comm = par.world()                                  # MPI starts here, not at import
    model = par.DataParallel(model, comm, bucket_mb=25, optimizer=opt)   # backward averages the gradients

Modules: comm (Communicator over mpi4py, host staging of device buffers, abort_on_error), buckets (gradient
buckets and the Reducer that overlaps their allreduce with backward), overlap_choice (overlap = "auto": the
faster of overlapping and not, timed), data_parallel (DataParallel, model
verification, broadcast), sharded_optimizer (ShardedOptimizer: ZeRO stages 1 and 2), mpi_mode / data_mode (the
Trainer's modes over MPI), mpi_job (a job under mpirun: its mode, the run context, cores shared among a node's
ranks), watchdog (bounded waits), pipeline/ (pipeline parallelism: its own package). `trace` is re-exported
from disttrain.trace.
Importing this package does not initialise MPI.
"""
from disttrain.parallel.comm import Communicator, abort_on_error, world
from disttrain.parallel.data_parallel import DataParallel, ModelMismatchError
from disttrain.parallel.data_mode import DataParallelMode
from disttrain.parallel.sharded_optimizer import ShardedOptimizer
from disttrain import trace

__all__ = ["Communicator", "DataParallel", "DataParallelMode", "ModelMismatchError", "ShardedOptimizer",
           "abort_on_error", "trace", "world"]
