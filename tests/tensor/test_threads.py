"""Intra-op threads: row blocks cover every row once, and threaded kernels equal one thread bit for bit."""
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import threadpoolctl

import disttrain as dt
from disttrain.nn import functional as F
from disttrain.tensor import kernels_numpy, threads
from disttrain.tensor.threads import blas_kernel_note


@pytest.fixture
def num_threads():
    """set_num_threads for one test; the earlier setting comes back afterwards."""
    before = threads.get_num_threads()
    yield threads.set_num_threads
    threads.set_num_threads(before)


@pytest.mark.parametrize("n,rows,per_row", [(1, 1000, 10_000), (2, 1000, 10_000), (3, 7, 1 << 20), (4, 3, 1 << 20),
                                            (4, 1000, 10)])
def test_blocks_cover_every_row_once(num_threads, n, rows, per_row):
    num_threads(n)
    seen = np.zeros(rows, dtype=int)
    calls = []

    def fn(lo, hi):
        seen[lo:hi] += 1
        calls.append((lo, hi))

    threads.parallel_rows(fn, rows, per_row)
    assert (seen == 1).all()
    assert len(calls) <= n
    if rows * per_row < 2 * threads.MIN_ELEMENTS_PER_THREAD:
        assert calls == [(0, rows)]                       # small work stays on the calling thread
    assert sorted(calls) == threads.row_blocks(rows, per_row)  # the blocks the compiled kernels take too


def test_no_blocks_for_no_rows():
    assert threads.row_blocks(0, 100) == [] and threads.row_blocks(-3, 100) == []


def test_an_error_in_a_block_is_raised_after_every_block_finished(num_threads):
    num_threads(2)
    done = []

    def fn(lo, hi):
        if lo == 0:
            raise ValueError("block 0 failed")
        done.append(lo)

    with pytest.raises(ValueError, match="block 0 failed"):
        threads.parallel_rows(fn, 100, 1 << 20)
    assert done == [50]


def test_a_block_whose_thread_has_not_started_runs_on_the_calling_thread(num_threads):
    num_threads(2)
    release = threading.Event()
    pool = threads._pool_for(1)
    busy = [pool.submit(release.wait, 20) for _ in range(threads._pool_size)]  # every pool thread occupied
    ran_on = {}

    def fn(lo, hi):
        ran_on[lo] = threading.get_ident()

    try:
        threads.parallel_rows(fn, 100, 1 << 20)
    finally:
        release.set()
        for future in busy:
            future.result()
    assert sorted(ran_on) == [0, 50] and set(ran_on.values()) == {threading.get_ident()}


def _cross_entropy_pass(seed=0):
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((400, 2000)).astype(np.float32) * 4
    target = rng.integers(0, 2000, 400)
    target[::7] = -100
    losses, saved = kernels_numpy.cross_entropy_forward(np, logits, target, -100, keep_softmax=True)
    grad = kernels_numpy.cross_entropy_backward(np, logits, np.where(target < 0, 0, target), saved,
                                                np.full(400, 0.5, np.float32))
    out = logits.copy()
    kernels_numpy.add_bias_(np, out, rng.standard_normal(2000).astype(np.float32))
    return losses, grad, out


def test_threaded_kernels_equal_one_thread_bit_for_bit(num_threads):
    num_threads(1)
    one = _cross_entropy_pass()
    num_threads(2)
    two = _cross_entropy_pass()
    for a, b in zip(one, two):
        np.testing.assert_array_equal(a, b)


def _optimizer_updates(seed=0):
    """SGD with momentum (first and later steps), Adam, AMSGrad-AdamW and a clip scale on arrays big
    enough to split into element blocks."""
    rng = np.random.default_rng(seed)
    n = 3 * threads.MIN_ELEMENTS_PER_THREAD + 5
    param, grad = rng.standard_normal(n).astype(np.float32), rng.standard_normal(n).astype(np.float32)
    buf = kernels_numpy.sgd_step(np, param, grad, None, 0.1, momentum=0.9, weight_decay=0.01, nesterov=True)
    kernels_numpy.sgd_step(np, param, grad, buf, 0.1, momentum=0.9, dampening=0.1)
    kernels_numpy.sgd_step(np, param, grad, None, 1.0, maximize=True)
    moments = [np.zeros(n, np.float32) for _ in range(5)]
    kernels_numpy.adam_step(np, param, grad, moments[0], moments[1], None, 3, 0.01, 0.9, 0.999, 1e-8,
                            weight_decay=0.1)
    kernels_numpy.adam_step(np, param, grad, *moments[2:5], 1, 0.01, 0.9, 0.99, 1e-8, weight_decay=0.1,
                            decoupled=True)
    kernels_numpy.scale_(np, [grad], 0.37)
    return [param, grad, buf] + moments


def test_threaded_optimizer_updates_equal_one_thread_bit_for_bit(num_threads, monkeypatch):
    num_threads(1)
    one = _optimizer_updates()
    num_threads(2)
    blocks = []
    real = threads.parallel_rows

    def counting(fn, rows, per_row, **kwargs):
        blocks.append(len(threads.row_blocks(rows, per_row)))
        real(fn, rows, per_row, **kwargs)

    monkeypatch.setattr(kernels_numpy, "parallel_rows", counting)
    two = _optimizer_updates()
    assert blocks and all(n == 2 for n in blocks)             # every update did run as two blocks
    for a, b in zip(one, two):
        np.testing.assert_array_equal(a, b)


def test_linear_and_cross_entropy_gradients_equal_one_thread(num_threads):
    """The elementwise passes' threads change no bit (the BLAS's own thread count may: not tested here)."""
    def grads():
        dt.manual_seed(0)
        x = dt.randn(300, 64, requires_grad=True)
        w = dt.randn(3000, 64, requires_grad=True)
        b = dt.randn(3000, requires_grad=True)
        loss = F.cross_entropy(F.linear(x, w, b), dt.randint(0, 3000, (300,)))
        loss.backward()
        return [loss.numpy()] + [t.grad.numpy() for t in (x, w, b)]

    def with_threads(n):
        num_threads(n)
        with threadpoolctl.threadpool_limits(1, user_api="blas"):   # GEMMs split the same way on both sides
            return grads()

    for a, b in zip(with_threads(1), with_threads(2)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_set_num_threads_names_the_bad_value(num_threads, bad):
    with pytest.raises(ValueError, match=f"expected an int >= 1, got {bad!r}"):
        num_threads(bad)


def test_thread_count_follows_the_environment(monkeypatch):
    for var in ("DISTTRAIN_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "3")
    assert threads._default_threads() == 3
    monkeypatch.setenv("DISTTRAIN_NUM_THREADS", "1")          # ours first
    assert threads._default_threads() == 1
    monkeypatch.setenv("DISTTRAIN_NUM_THREADS", "many")
    with pytest.raises(ValueError, match=r"\$DISTTRAIN_NUM_THREADS must be a positive integer, got 'many'"):
        threads._default_threads()


AVX512 = {"fma", "avx2", "avx512f"}


@pytest.mark.parametrize("environ, flags, kernels, warns", [
    ({"OPENBLAS_CORETYPE": "Haswell"}, AVX512, ["Haswell"], True),
    ({"OPENBLAS_CORETYPE": "Haswell"}, {"fma", "avx2"}, ["Haswell"], False),     # an AVX2 CPU: Haswell is its best
    ({"OPENBLAS_CORETYPE": "SkylakeX"}, AVX512, ["SkylakeX"], False),
    ({}, AVX512, ["Haswell"], False),                                            # OpenBLAS's own choice
    ({"OPENBLAS_CORETYPE": "Haswell"}, AVX512, [], False),                       # no OpenBLAS loaded (MKL)
])
def test_blas_kernel_note_names_a_coretype_that_holds_back_an_avx512_cpu(environ, flags, kernels, warns):
    note = blas_kernel_note(environ, flags, kernels)
    assert (note is not None) == warns
    if warns:
        assert "OPENBLAS_CORETYPE=Haswell" in note and "AVX-512" in note


def _blas_wait_after_import(first_import, environ_value=None):
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    if environ_value is not None:
        env["OPENBLAS_THREAD_TIMEOUT"] = environ_value
    code = f"import {first_import}; import disttrain, os; print(os.environ.get('OPENBLAS_THREAD_TIMEOUT'))"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    return done.stdout.strip()


def test_importing_disttrain_first_shortens_openblas_idle_wait():
    assert _blas_wait_after_import("sys") == "16"
    assert _blas_wait_after_import("sys", environ_value="28") == "28"     # the user's choice stays
    assert _blas_wait_after_import("numpy") == "None"                     # too late: OpenBLAS has read it
