"""OpenBLAS's parallel jobs on disttrain's threads (disttrain/kernels_cpu/blas_threads.cpp).

Every check runs in a subprocess with a time-out: a job left without a thread or a lost wake-up would
hang the BLAS for the rest of the process, so a hang fails that test alone, with a message.
"""
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from disttrain.kernels_cpu import native

pytestmark = pytest.mark.skipif(native.library() is None,
                                reason=f"compiled CPU kernels unavailable: {native.unavailable_reason()}")

HANG = 120  # seconds: far beyond any of these products on a loaded 2-core box

PRELUDE = """
import os, signal, threading
import numpy as np
import disttrain as dt
from disttrain.kernels_cpu import native
from disttrain.tensor import threads
native.library()

def team_calls():
    return native.library().dt_blas_team_calls()

def operands(dtype, seed, m=300, k=256, n=1500):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((m, k)).astype(dtype), rng.standard_normal((k, n)).astype(dtype)

def one_thread_product(a, b):
    with threads.one_blas_thread():
        return a @ b

dt.set_num_threads(4)
"""


def _run(code, env=None):
    """stdout of PRELUDE + code in a fresh interpreter, which must exit 0 within HANG seconds. On a time-out
    its whole process group is killed: a hung BLAS job busy-waits, in a forked child too."""
    process = subprocess.Popen([sys.executable, "-c", PRELUDE + textwrap.dedent(code)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})},
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=HANG)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail(f"still running after {HANG} s: a BLAS call hung")
    assert process.returncode == 0, stdout + stderr
    return stdout.split()


def test_numpys_openblas_takes_the_callback():
    assert native.blas_jobs_on_our_threads(), (
        "NumPy's OpenBLAS has no openblas_set_threads_callback_function (OpenBLAS < 0.3.27?) or "
        f"${native.BLAS_THREADS_ENV_VAR} is set to openblas")


def test_a_threaded_gemm_runs_on_the_team_and_equals_the_one_thread_product():
    out = _run("""
        # float32 bitwise; OpenBLAS's threaded dgemm sums a few elements in another order (0.03% of them
        # here), on its own threads as well
        for dtype, same in ((np.float32, np.array_equal),
                            (np.float64, lambda x, y: np.allclose(x, y, rtol=1e-13, atol=1e-12))):
            a, b = operands(dtype, seed=1)
            expected = one_thread_product(a, b)
            before = team_calls()
            got = a @ b
            print(team_calls() > before, same(got, expected))
    """)
    assert out == ["True"] * 4


def test_gemms_from_several_python_threads_at_once():
    out = _run("""
        pairs = [operands(np.float32, seed) for seed in range(4)]
        expected = [one_thread_product(a, b) for a, b in pairs]
        wrong = []

        def repeat(index):
            a, b = pairs[index]
            for _ in range(15):
                if not np.array_equal(a @ b, expected[index]):
                    wrong.append(index)

        workers = [threading.Thread(target=repeat, args=(i,)) for i in range(len(pairs))]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        print(len(wrong), team_calls() >= 4 * 15)
    """)
    assert out == ["0", "True"]


def test_thread_counts_that_change_between_calls():
    out = _run("""
        a, b = operands(np.float32, seed=2)
        expected = one_thread_product(a, b)
        for count in (2, 4, 3, 2, 4):
            dt.set_num_threads(count)
            print(np.array_equal(a @ b, expected))
    """)
    assert out == ["True"] * 5


def test_a_forked_child_gets_a_team_of_its_own():
    out = _run("""
        a, b = np.ones((300, 256), np.float32), np.ones((256, 1500), np.float32)
        a @ b
        pid = os.fork()
        if pid == 0:
            signal.alarm(60)  # a hung child dies on its own (SIGALRM's default action), not left orphaned
            os._exit(0 if (a @ b == 256).all() and team_calls() > 1 else 1)
        _, status = os.waitpid(pid, 0)
        print(os.waitstatus_to_exitcode(status))
    """)
    assert out == ["0"]


def test_openblas_keeps_its_own_threads_when_asked():
    out = _run("""
        np.ones((300, 256), np.float32) @ np.ones((256, 1500), np.float32)
        print(native.blas_jobs_on_our_threads(), team_calls())
    """, env={native.BLAS_THREADS_ENV_VAR: "openblas"})
    assert out == ["False", "0"]


def test_a_bad_choice_is_named(monkeypatch):
    monkeypatch.setenv(native.BLAS_THREADS_ENV_VAR, "mkl")
    with pytest.raises(ValueError, match=r"\$DISTTRAIN_BLAS_THREADS must be one of disttrain, openblas, got 'mkl'"):
        native.blas_threads_requested()
