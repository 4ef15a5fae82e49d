"""What `disttrain run` needs to run a job under mpirun: the mode for the job and the run context.

    mode = mode_for(spec)              # DataParallelMode ("data"), PipelineMode ("pipeline"), else LocalMode
    trainer = Trainer.from_job(spec, out_dir=out, mode=mode)
    with run_context(trainer.mode, trace_path, passthrough=(TrainingInterrupted,)):
        trainer.fit()

run_context makes a failing rank end the whole job (MPI_Abort) instead of leaving the others waiting, and
with a trace path records a Chrome trace of every rank's spans, written by rank 0 at the end.
"""
import contextlib
import os

from disttrain import trace
from disttrain.parallel.comm import abort_on_error, world
from disttrain.parallel.pipeline.rank_layout import check_layout
from disttrain.tensor.threads import available_cores, set_num_threads, user_thread_count
from disttrain.train.jobspec import JobSpecError, job_differences
from disttrain.train.mode import LocalMode

__all__ = ["mode_for", "check_launch", "check_ranks", "agree_on_setup", "run_context", "launched_size",
           "launched_rank", "launched_by_mpi",
           "local_size", "share_cores", "data_shares"]

_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE")     # MPICH / Intel MPI / srun --mpi=pmi2; Open MPI
_RANK_VARS = ("PMI_RANK", "OMPI_COMM_WORLD_RANK")


def mode_for(spec, command=None):
    """The mode a job spec asks for (after check_launch): LocalMode, DataParallelMode or PipelineMode."""
    check_launch(spec, command)
    if spec.parallel.mode not in ("data", "pipeline"):
        return LocalMode()
    world().set_timeout(spec.parallel.timeout_s)
    if spec.parallel.mode == "pipeline":
        from disttrain.parallel.pipeline.pipeline_mode import PipelineMode

        return PipelineMode.from_spec(spec, world())
    from disttrain.parallel.data_mode import DataParallelMode

    return DataParallelMode.from_spec(spec, world())


def check_launch(spec, command=None):
    """Raise JobSpecError unless the processes launched (read from the launcher's environment, before MPI
    starts, so every rank finds the same answer) fit the job's [parallel] mode and [data] batch_size. command:
    what each rank runs, for the advice (default: `disttrain run` of the job file)."""
    mode, size = spec.parallel.mode, launched_size()
    where = f"{spec.source}: [parallel] mode = \"{mode}\""
    if mode == "local" and size > 1:
        raise JobSpecError(f'{where} but {size} processes were launched; set mode = "data" '
                           f'(--set parallel.mode=data) or run one process')
    if mode not in ("data", "pipeline"):
        return
    if not launched_by_mpi():
        example = spec.parallel.stages if mode == "pipeline" else 2
        if command is not None:
            how = f"mpiexec -n {example} {command}"
        else:
            again = f"{spec.source} --set parallel.mode={mode}"  # the mode may have come from a --set: say it
            how = (f"mpiexec -n {example} disttrain run {again} (or disttrain launch -n {example} {again}), with "
                   "your other options")
        raise JobSpecError(f"{where}, but this is 1 process, not started by mpiexec; {mode} mode runs one process "
                           f"per rank: {how}, or set mode = \"local\"")
    check_ranks(spec, size)


def check_ranks(spec, ranks, ranks_option=None):
    """Raise JobSpecError unless `ranks` processes can run the job's data-parallel mode ([data] batch_size
    divides among them) or pipeline (check_layout); other modes pass. ranks_option: the command-line option that
    gave `ranks` (`disttrain plan --ranks`), which the message then names; None: the processes launched."""
    mode, batch = spec.parallel.mode, spec.data.batch_size
    if mode == "data" and batch % ranks:
        divisors = [n for n in range(1, min(batch, 4 * ranks) + 1) if batch % n == 0]
        fitting = ", ".join(map(str, divisors[-4:]))
        among, instead = ((f"the {ranks} ranks launched", f"launch {fitting} ranks") if ranks_option is None else
                          (f"the {ranks} ranks of {ranks_option} {ranks}", f"{ranks_option} {fitting}"))
        raise JobSpecError(f"{spec.source}: [data] batch_size = {batch} does not divide among {among} (each trains "
                           f"on batch_size / ranks streams); expected a multiple of {ranks}, or {instead}")
    if mode == "pipeline":
        check_layout(ranks, spec.parallel.stages, spec.parallel.micro_batches, batch, spec.source,
                     ranks_option=ranks_option)


def agree_on_setup(failure, job=None):
    """[(rank, failure)] of every rank whose setup failed, on every rank (empty: none did).

    failure: None when this rank's own work before the job's first collective (reading the job, its data, the
    checkpoint) succeeded, else plain data saying how it failed; job: this rank's resolved job (to_dict()).
    Shared by one collective among the launched processes, so that all of them stop when any failed. A rank
    whose job differs from rank 0's (but for [data] path) fails too, with (True, the keys that differ): ranks
    given other job files or --set values would otherwise train apart without a word (a lr), or wait for each
    other (a step budget). In a one-process job, this process's failure alone."""
    if launched_size() <= 1:
        return [] if failure is None else [(0, failure)]
    outcomes = world().allgather_object((failure, job), what="agreement on the job's setup (each rank's checks)")
    failed = [(rank, failure) for rank, (failure, _) in enumerate(outcomes) if failure is not None]
    if failed:
        return failed
    first = outcomes[0][1]
    mismatched = [(rank, diffs) for rank, (_, job) in enumerate(outcomes) if (diffs := _job_differences(first, job))]
    return [(rank, (True, _describe_mismatch(diffs))) for rank, diffs in mismatched]


def _job_differences(first, other):
    """Where two ranks' jobs differ, but for [data] path: hosts may keep the same corpus in other places."""
    return [diff for diff in job_differences(first, other) if diff[:2] != ("data", "path")]


def _describe_mismatch(diffs):
    return ("its job differs from rank 0's: "
            + "; ".join(f"[{section}] {key} = {b!r} (rank 0: {a!r})" for section, key, a, b in diffs)
            + "; every rank must run the same job file and --set values")


def data_shares(spec):
    """How many shares each batch is cut into: the data-parallel ranks, or a pipeline's replicas (1 locally)."""
    if spec.parallel.mode == "data":
        return launched_size()
    if spec.parallel.mode == "pipeline":
        return max(1, launched_size() // spec.parallel.stages)
    return 1


def launched_size():
    """How many processes mpirun / mpiexec / srun started, read from their environment (MPI not started)."""
    return _launcher_number(_SIZE_VARS, 1)


def launched_rank():
    """This process's rank as the launcher numbered it (0 when not launched by one)."""
    return _launcher_number(_RANK_VARS, 0)


def launched_by_mpi():
    """Whether an MPI launcher (mpiexec, mpirun, srun) started this process, even as a single rank."""
    return any(os.environ.get(name, "").isdigit() for name in _SIZE_VARS)


def _launcher_number(names, default):
    for name in names:
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return default


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
    that preempt each other mid-GEMM, which makes a small GEMM many times slower (benchmarks/RESULTS.md).
    launch/mpirun.sh exports the same policy; this covers a plain `mpiexec -n N disttrain run`.
    """
    ranks = local_size()
    if ranks <= 1 or user_thread_count() is not None:
        return None
    n = max(1, available_cores() // ranks)
    set_num_threads(n)
    return n


@contextlib.contextmanager
def run_context(mode, trace_path=None, passthrough=(), steps=None):
    """Around a rank's training run: abort the job on an error (multi-process strategies only; exceptions of
    the `passthrough` types propagate) and, when trace_path is given, record spans (of the training steps
    steps[0]..steps[1] only, when given) and write them as one Chrome trace on the main rank."""
    comm = getattr(mode, "comm", None)
    with abort_on_error(comm, passthrough) if comm is not None else contextlib.nullcontext():
        if trace_path is None:
            yield
            return
        tracer = trace.Tracer(rank=getattr(mode, "rank", 0), steps=steps)
        tracer.start(comm)
        with trace.tracing(tracer):
            yield
        written = tracer.write(trace_path, comm)
        if written is not None:
            print(f"trace: {written} (open in https://ui.perfetto.dev or chrome://tracing)", flush=True)
