"""What `disttrain run` needs to run a job under mpirun: the strategy for the job's mode and the run context.

    strategy = strategy_for(spec)      # DataParallelStrategy ("data"), PipelineStrategy ("pipeline"), else None
    trainer = Trainer(spec, out_dir=out, strategy=strategy)
    if strategy is not None:
        strategy.attach(trainer.model, trainer.optimizer)
    with run_context(trainer.strategy, trace_path, passthrough=(TrainingInterrupted,)):
        trainer.fit()

run_context makes a failing rank end the whole job (MPI_Abort) instead of leaving the others waiting, and
with a trace path records a Chrome trace of every rank's spans, written by rank 0 at the end.
"""
import contextlib
import os

from disttrain import trace
from disttrain.parallel.comm import abort_on_error, world
from disttrain.tensor.threads import available_cores, set_num_threads, user_thread_count
from disttrain.train.jobspec import JobSpecError

__all__ = ["strategy_for", "run_context", "launched_size", "local_size", "share_cores"]


def strategy_for(spec):
    """The distributed strategy a job spec asks for, or None for local mode.

    Raises JobSpecError for a local-mode job started as several processes (each would train its own copy
    into the same output directory).
    """
    if spec.parallel.mode == "local" and launched_size() > 1:
        raise JobSpecError(f'{spec.source}: [parallel] mode = "local" but {launched_size()} processes were '
                           f'launched; set mode = "data" (--set parallel.mode=data) or run one process')
    if spec.parallel.mode not in ("data", "pipeline"):
        return None
    if spec.parallel.mode == "pipeline":
        return _pipeline_strategy(spec)
    world().set_timeout(spec.parallel.timeout_s)
    from disttrain.parallel.strategy import DataParallelStrategy

    return DataParallelStrategy(world(), bucket_mb=spec.parallel.bucket_mb, overlap=spec.parallel.overlap)


def _pipeline_strategy(spec):
    """PipelineStrategy for the job, after checking the launched world fits [parallel] stages and the batch."""
    stages, size, batch = spec.parallel.stages, launched_size(), spec.data.batch_size
    if size % stages:
        raise JobSpecError(f"{spec.source}: [parallel] stages = {stages} but {size} processes were launched; "
                           f"expected a world size that is a multiple of the stages (mpirun -n {stages} for one "
                           f"pipeline, -n {2 * stages} for two data-parallel replicas)")
    replicas = size // stages
    if batch % replicas or (batch // replicas) % spec.parallel.micro_batches:
        raise JobSpecError(f"{spec.source}: [parallel] micro_batches = {spec.parallel.micro_batches}: expected a "
                           f"divisor of the {batch / replicas:g} streams each of the {replicas} replicas trains on "
                           f"([data] batch_size = {batch} / {replicas})")
    from disttrain.parallel.pipeline.strategy import PipelineStrategy

    world().set_timeout(spec.parallel.timeout_s)
    return PipelineStrategy.from_spec(spec, world())


def launched_size():
    """How many processes mpirun / mpiexec / srun started, read from their environment (MPI not started)."""
    for name in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE"):      # MPICH / Intel MPI / srun --mpi=pmi2; Open MPI
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 1


def local_size():
    """How many of the launched processes run on this node (MPICH/Hydra, Open MPI, Slurm), else launched_size()."""
    for name in ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", "SLURM_NTASKS_PER_NODE"):
        value = os.environ.get(name, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return launched_size()


def share_cores():
    """Give each of the ranks on this node cores / ranks threads (BLAS and elementwise), unless the user set a
    thread count (DISTTRAIN_NUM_THREADS, OMP_NUM_THREADS, OPENBLAS_NUM_THREADS). Returns the count set, or None.

    Why: every process's BLAS starts one thread per core, so N ranks on one node would run N x cores threads
    that preempt each other mid-GEMM (measured on the 2-core dev box with two busy processes: a small GEMM
    took 15.6 ms with 2 BLAS threads, 0.39 ms with 1). launch/mpirun.sh exports the same policy; this covers
    a plain `mpiexec -n N disttrain run`.
    """
    ranks = local_size()
    if ranks <= 1 or user_thread_count() is not None:
        return None
    n = max(1, available_cores() // ranks)
    set_num_threads(n)
    return n


@contextlib.contextmanager
def run_context(strategy, trace_path=None, passthrough=()):
    """Around a rank's training run: abort the job on an error (multi-process strategies only; exceptions of
    the `passthrough` types propagate) and, when trace_path is given, record spans and write them as one
    Chrome trace on the main rank."""
    comm = getattr(strategy, "comm", None)
    with abort_on_error(comm, passthrough) if comm is not None else contextlib.nullcontext():
        if trace_path is None:
            yield
            return
        tracer = trace.Tracer(rank=getattr(strategy, "rank", 0))
        tracer.start(comm)
        with trace.tracing(tracer):
            yield
        written = tracer.write(trace_path, comm)
        if written is not None:
            print(f"trace: {written} (open in https://ui.perfetto.dev or chrome://tracing)", flush=True)
