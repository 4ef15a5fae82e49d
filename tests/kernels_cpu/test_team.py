"""disttrain's CPU threads (disttrain/kernels_cpu/team.cpp): OpenBLAS's parallel jobs, and the compiled kernels'
row blocks.

Every check runs in a subprocess with a time-out: a job left without a thread or a lost wake-up would
hang the BLAS or the kernels for the rest of the process, so a hang fails that test alone, with a message.
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
from disttrain.kernels_cpu import native, wrappers
from disttrain.tensor import threads
native.library()

def team_calls():
    return native.library().dt_blas_team_calls()

def block_calls():
    return native.library().dt_block_team_calls()

def losses(logits, target):
    return wrappers.cross_entropy_forward(np, logits, target, -100)[0]

def lstm_case(seed, dtype=np.float64, steps=12, batch=16, hidden=128):
    # an LSTM layer's forward results and the backward's other inputs
    rng = np.random.default_rng(seed)
    w_hh = (rng.standard_normal((4 * hidden, hidden)) * 0.1).astype(dtype)
    h0, c0 = ((rng.standard_normal((batch, hidden)) * 0.1).astype(dtype) for _ in range(2))
    gates_x = rng.standard_normal((steps, batch, 4 * hidden)).astype(dtype)
    out, cs, acts, tanh_c = wrappers.lstm_layer_forward(np, gates_x, h0, c0, w_hh)
    return rng.standard_normal(out.shape).astype(dtype), h0, c0, acts, tanh_c, out, cs, w_hh

def lstm_backward(case):
    d_out, h0, c0, acts, tanh_c, out, cs, w_hh = case
    return wrappers.lstm_layer_backward(np, d_out, h0, c0, acts, tanh_c, out, cs, h0, c0, w_hh)

def operands(dtype, seed, m=300, k=256, n=1500):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((m, k)).astype(dtype), rng.standard_normal((k, n)).astype(dtype)

def one_thread_product(a, b):
    with threads.one_blas_thread():
        return a @ b

def wrong_results(calls, expected, repeats):
    # each call repeated from a Python thread of its own, all threads at once: how many results differed
    wrong = []

    def repeat(index):
        for _ in range(repeats):
            if not np.array_equal(calls[index](), expected[index]):
                wrong.append(index)

    workers = [threading.Thread(target=repeat, args=(i,)) for i in range(len(calls))]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return len(wrong)

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
        calls = [lambda a=a, b=b: a @ b for a, b in pairs]
        print(wrong_results(calls, expected, repeats=15), team_calls() >= 4 * 15)
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


# ---- the row blocks of the compiled kernels -----------------------------------------------------------

def test_a_kernels_blocks_run_on_the_row_team_and_equal_one_threads_result():
    out = _run("""
        rng = np.random.default_rng(3)
        logits = rng.standard_normal((512, 3000)).astype(np.float32)
        target = rng.integers(0, 3000, 512)
        dt.set_num_threads(1)
        expected = losses(logits, target)
        dt.set_num_threads(4)
        before = block_calls()
        got = losses(logits, target)
        print(block_calls() - before, np.array_equal(got, expected))
    """)
    assert out == ["1", "True"]


def test_kernels_from_several_python_threads_at_once():
    out = _run("""
        rng = np.random.default_rng(4)
        cases = [(rng.standard_normal((256, 4000)).astype(np.float32), rng.integers(0, 4000, 256)) for _ in range(4)]
        expected = [losses(*case) for case in cases]
        calls = [lambda case=case: losses(*case) for case in cases]
        print(wrong_results(calls, expected, repeats=20))
    """)
    assert out == ["0"]


def test_a_block_may_run_threaded_gemms():
    # the wrappers hold the BLAS to one thread around the LSTM's blocks, but another Python thread may set it back
    # meanwhile: a block's GEMM then hands jobs to the BLAS team, which must not wait for the row team's call
    out = _run("""
        case = lstm_case(seed=5, steps=3, batch=32, hidden=256)
        expected = lstm_backward(case)
        d_out, h0, c0, acts, tanh_c, out, cs, w_hh = case
        (steps, batch, hidden), d_gates = out.shape, np.empty_like(acts)
        dh0, dc0, dh_step = (np.empty_like(h0) for _ in range(3))
        bounds = np.array([0, batch // 2, batch], dtype=np.int64)
        args = wrappers._pointers(d_out, h0, c0, acts, tanh_c, cs, c0, w_hh, None, d_gates, dh0, dc0, dh_step)
        before = team_calls()
        native.library().dt_lstm_backward_f64(*args, steps, batch, hidden, bounds.ctypes.data, 2, 0)
        print(team_calls() > before, np.allclose(d_gates, expected[0], rtol=1e-13, atol=1e-13),
              np.allclose(dh0, expected[1], rtol=1e-13, atol=1e-13))
    """)
    assert out == ["True", "True", "True"]


def test_a_forked_child_gets_a_row_team_of_its_own():
    out = _run("""
        logits, target = np.ones((512, 3000), np.float32), np.zeros(512, np.int64)
        expected = losses(logits, target)
        pid = os.fork()
        if pid == 0:
            signal.alarm(60)  # a hung child dies on its own, not left orphaned
            before = block_calls()
            os._exit(0 if np.array_equal(losses(logits, target), expected) and block_calls() > before else 1)
        _, status = os.waitpid(pid, 0)
        print(os.waitstatus_to_exitcode(status))
    """)
    assert out == ["0"]
