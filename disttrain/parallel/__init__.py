"""disttrain.parallel: MPI communicator, data parallelism, tracing.

    import disttrain.parallel as par
    comm = par.world()                                  # MPI starts here, not at import
    model = par.DataParallel(model, comm, bucket_mb=25, optimizer=opt)   # backward averages the gradients

Modules: comm (Communicator over mpi4py, host staging of device buffers, abort_on_error), buckets (gradient
buckets and the Reducer that overlaps their allreduce with backward), data_parallel (DataParallel, model
verification, broadcast), sharded_optimizer (ShardedOptimizer: ZeRO stages 1 and 2), strategy
(DataParallelStrategy for the Trainer), trace (Chrome-trace timelines).
Importing this package does not initialise MPI.
"""
from disttrain.parallel.comm import Communicator, abort_on_error, world
from disttrain.parallel.data_parallel import DataParallel, ModelMismatchError
from disttrain.parallel.sharded_optimizer import ShardedOptimizer
from disttrain.parallel.strategy import DataParallelStrategy
from disttrain import trace

__all__ = ["Communicator", "DataParallel", "DataParallelStrategy", "ModelMismatchError", "ShardedOptimizer",
           "abort_on_error", "trace", "world"]
