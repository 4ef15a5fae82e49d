"""What `disttrain run` checks before anything large is allocated: user mistakes become one-line errors.

    data = check_run(args, spec, out)       # JobSpecError naming the bad value and where it came from

Each failure is a JobSpecError (exit status 2 in the CLI). Under mpiexec every rank makes the checks of the
job, the launch and the data on what it sees (a file may be missing on one host only); the output directory
and the memory, which only rank 0's machine decides (rank 0 writes the outputs; a machine's free memory
changes from one moment to the next), are checked on rank 0. No check waits for another rank: `disttrain
run` shares every rank's outcome once they are all done (mpi_job.agree_on_setup), and all stop if one failed.
"""
import sys
import tempfile
from pathlib import Path

from disttrain.parallel.mpi_job import check_launch, data_shares, launched_by_mpi, launched_rank, local_size
from disttrain.data.source import LanguageModelData
from disttrain.train.build import build_data
from disttrain.train.jobspec import JobSpecError
from disttrain.train.memory_plan import check_fits

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = ["check_run", "check_job_file", "check_out_dir", "check_batch_fits", "check_memory"]

_MIN_TOKENS_PER_STREAM = 2       # an input and a target


def check_run(args, spec, out):
    """Every check of `disttrain run JOB`; returns the job's data source (built once: the Trainer takes it).
    The batch and memory checks know the built-in language-model families and corpora; a job's own model or
    data (factories) is checked when it runs."""
    check_job_file(args.job)
    check_launch(spec)
    if getattr(args, "trace_steps", None) and not args.trace:
        raise JobSpecError(f"--trace-steps {args.trace_steps[0]}:{args.trace_steps[1]}: needs --trace FILE, "
                           "the file the spans are written to")
    _on_rank0(lambda: check_out_dir(out))
    data = build_data(spec)
    if isinstance(data, LanguageModelData):
        check_batch_fits(spec, data.corpus)
        if spec.model.factory is None:      # a factory's model has no estimate until it is built
            _on_rank0(lambda: check_memory(spec, data.vocab_size))
    return data


def check_job_file(path):
    """A job file without a single key is refused: it is more likely a mistake (an empty or wrong file) than a
    wish for every default, which an empty section header ([train]) states."""
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return                  # load_job has reported these already
    if not data:
        raise JobSpecError(f"{path}: the job file is empty, so every key would take its default (a 2 x 200 LSTM "
                           "on the embedded corpus for 1 epoch); write the keys to change, or at least one section "
                           "header such as [train] to run with every default")


def check_out_dir(out):
    """The output directory can be created (or is there) and written in; nothing is left behind by the check."""
    out = Path(out).absolute()
    existing = next(p for p in [out, *out.parents] if p.exists())
    if not existing.is_dir():
        raise JobSpecError(f"--out {out}: {existing} is a file, not a directory; choose another output directory")
    try:
        with tempfile.TemporaryFile(dir=existing):      # what creating the directory and its files needs
            pass
    except OSError as exc:
        raise JobSpecError(f"--out {out}: cannot write in {existing} ({exc.strerror or exc}); choose a directory "
                           "you can write to") from None


def check_batch_fits(spec, corpus):
    """[data] batch_size streams of at least two tokens each fit in the train split."""
    tokens, batch = int(corpus.train.size), spec.data.batch_size
    if tokens // batch < _MIN_TOKENS_PER_STREAM:
        most = tokens // _MIN_TOKENS_PER_STREAM
        raise JobSpecError(f"{spec.source}: [data] batch_size = {batch} is larger than the data allows: the train "
                           f"split has {tokens:,} tokens, enough for at most {most:,} streams of "
                           f"{_MIN_TOKENS_PER_STREAM} tokens; expected batch_size <= {most:,}")


def check_memory(spec, vocab_size):
    """The job's estimated memory (disttrain.train.memory_plan) for this machine's ranks fits what it has free.
    Only host memory is estimated: a job on a GPU is not checked."""
    if spec.train.device != "cpu":
        return
    stages = spec.parallel.stages if spec.parallel.mode == "pipeline" else 1
    check_fits(spec, vocab_size, streams=spec.data.batch_size // data_shares(spec),
               processes=local_size() if launched_by_mpi() else 1, stages=stages)


def _on_rank0(check):
    """Run `check` on rank 0 only: the output directory and the memory are the job's, not each rank's. No
    collective here: `disttrain run` shares every rank's outcome of its checks at once, after them all
    (mpi_job.agree_on_setup), so a rank that fails an earlier check never leaves the others waiting."""
    if launched_rank() == 0:
        check()
