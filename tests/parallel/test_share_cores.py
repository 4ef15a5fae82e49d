"""Ranks that share a node share its cores: cores / local ranks threads each, unless the user chose."""
import pytest
import threadpoolctl

from disttrain.parallel import mpi_job
from disttrain.tensor import threads

LAUNCH_VARS = ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", "SLURM_NTASKS_PER_NODE", "PMI_SIZE",
               "OMPI_COMM_WORLD_SIZE")


@pytest.fixture
def clean_env(monkeypatch):
    for name in LAUNCH_VARS + threads.THREAD_ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(mpi_job, "available_cores", lambda: 4)
    before = threads.get_num_threads()
    yield monkeypatch
    threads.set_num_threads(before)


def _blas_threads():
    return {info["num_threads"] for info in threadpoolctl.threadpool_info() if info["user_api"] == "blas"}


@pytest.mark.parametrize("var", ["MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", "SLURM_NTASKS_PER_NODE"])
def test_local_ranks_split_the_cores(clean_env, var):
    clean_env.setenv(var, "2")
    assert mpi_job.local_size() == 2
    assert mpi_job.share_cores() == 2
    assert threads.get_num_threads() == 2 and _blas_threads() == {2}


def test_more_ranks_than_cores_get_one_thread_each(clean_env):
    clean_env.setenv("PMI_SIZE", "8")                # no local count: every rank on this node
    assert mpi_job.share_cores() == 1
    assert threads.get_num_threads() == 1 and _blas_threads() == {1}


def test_one_process_or_a_chosen_count_is_left_alone(clean_env):
    assert mpi_job.share_cores() is None                # not launched by mpiexec
    clean_env.setenv("MPI_LOCALNRANKS", "2")
    clean_env.setenv("OMP_NUM_THREADS", "3")
    assert mpi_job.share_cores() is None
