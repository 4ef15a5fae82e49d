"""The compiled CPU kernels (disttrain.kernels_cpu) against the NumPy reference kernels.

Tolerances. float64: the same formulas in the same order except the GEMMs' summation order (the
compiled recurrence calls the BLAS on blocks of batch rows) and libm's exp/tanh for NumPy's, so the
results agree to a few ulp (rtol 1e-12 over a 20-step recurrence). float32: exp and tanh are our own
vectorised Cephes polynomials (<= 1 and <= 2 ulp, checked below), the row sums of exp add in another
order (vector lanes instead of NumPy's pairwise einsum), and GCC fuses multiply-adds; each of these is a
rounding of float32 (2^-24 relative), and the LSTM carries them through T steps of its recurrence and
their backward, so values agree to rtol 2e-5 / atol 2e-6 (observed: a few 1e-6 at T = 20).
"""
import subprocess
import sys

import numpy as np
import pytest

import disttrain as dt
from disttrain.kernels_cpu import native, wrappers
from disttrain.tensor import backend, kernels_numpy, threads

pytestmark = pytest.mark.skipif(native.library() is None,
                                reason=f"compiled CPU kernels unavailable: {native.unavailable_reason()}")

TOL = {np.float32: dict(rtol=2e-5, atol=2e-6), np.float64: dict(rtol=1e-12, atol=1e-13)}
SHAPES = [(20, 20, 200), (3, 5, 7), (1, 1, 1), (4, 33, 17)]   # (T, B, H): odd sizes leave vector tails


def _lstm_inputs(steps, batch, hidden, dtype, seed=0):
    rng = np.random.default_rng(seed)
    gates_x = rng.standard_normal((steps, batch, 4 * hidden)).astype(dtype)
    h0 = (rng.standard_normal((batch, hidden)) * 0.5).astype(dtype)
    c0 = rng.standard_normal((batch, hidden)).astype(dtype)
    w_hh = (rng.standard_normal((4 * hidden, hidden)) * (1.5 / np.sqrt(hidden))).astype(dtype)
    grads = [rng.standard_normal(s).astype(dtype) for s in ((steps, batch, hidden), (batch, hidden), (batch, hidden))]
    return gates_x, h0, c0, w_hh, grads


def _assert_all_close(got, expected, dtype):
    for k, (g, e) in enumerate(zip(got, expected)):
        assert g.dtype == e.dtype and g.shape == e.shape, k
        np.testing.assert_allclose(g, e, err_msg=f"result {k}", **TOL[dtype])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("steps,batch,hidden", SHAPES)
def test_lstm_layer_equals_the_numpy_kernels(num_threads, dtype, steps, batch, hidden):
    gates_x, h0, c0, w_hh, (d_out, dh_n, dc_n) = _lstm_inputs(steps, batch, hidden, dtype)
    expected = kernels_numpy.lstm_layer_forward(np, gates_x.copy(), h0, c0, w_hh)
    got = wrappers.lstm_layer_forward(np, gates_x.copy(), h0, c0, w_hh)
    _assert_all_close(got, expected, dtype)
    expected_grads = kernels_numpy.lstm_layer_backward(np, d_out, dh_n, dc_n, *expected[2:4], *expected[:2],
                                                       h0, c0, w_hh)
    got_grads = wrappers.lstm_layer_backward(np, d_out, dh_n, dc_n, *got[2:4], *got[:2], h0, c0, w_hh)
    _assert_all_close(got_grads, expected_grads, dtype)


def test_lstm_forward_consumes_gates_x_and_takes_any_layout():
    gates_x, h0, c0, w_hh, _ = _lstm_inputs(5, 6, 8, np.float32)
    expected = kernels_numpy.lstm_layer_forward(np, gates_x.copy(), h0, c0, w_hh)
    buffer = gates_x.copy()
    out, cs, acts, tanh_c = wrappers.lstm_layer_forward(np, buffer, h0, c0, w_hh)
    assert acts is buffer                                   # as documented: the activations in its buffer
    read_only = gates_x.copy()
    read_only.flags.writeable = False
    _assert_all_close(wrappers.lstm_layer_forward(np, read_only, h0, c0, w_hh), expected, np.float32)
    np.testing.assert_array_equal(read_only, gates_x)         # copied, not written
    fortran = wrappers.lstm_layer_forward(np, np.asfortranarray(gates_x), np.asfortranarray(h0), c0[:, :],
                                          np.asfortranarray(w_hh))
    _assert_all_close(fortran, expected, np.float32)


def test_the_batch_split_over_threads_changes_nothing_beyond_rounding():
    gates_x, h0, c0, w_hh, (d_out, dh_n, dc_n) = _lstm_inputs(20, 20, 200, np.float32, seed=3)
    results = []
    for n in (1, 2):
        before = threads.get_num_threads()
        threads.set_num_threads(n)
        try:
            fwd = wrappers.lstm_layer_forward(np, gates_x.copy(), h0, c0, w_hh)
            results.append(fwd + wrappers.lstm_layer_backward(np, d_out, dh_n, dc_n, *fwd[2:4], *fwd[:2], h0, c0, w_hh))
        finally:
            threads.set_num_threads(before)
    _assert_all_close(results[1], results[0], np.float32)


def test_gemm_chunks_follow_the_small_matrix_bound(monkeypatch):
    monkeypatch.setattr(native, "small_gemm_macs", lambda: 1_000_000)
    assert wrappers._rows_per_gemm(20, 200, np.float32) == 4      # at most 6 rows fit: calls of 4
    assert wrappers._rows_per_gemm(6, 200, np.float32) == 4
    assert wrappers._rows_per_gemm(4, 200, np.float32) == 0       # the whole batch in one call
    assert wrappers._rows_per_gemm(32, 256, np.float32) == 0      # 3 rows fit: fewer than SMALL_GEMM_ROWS
    assert wrappers._rows_per_gemm(20, 200, np.float64) == 0
    monkeypatch.setattr(native, "small_gemm_macs", lambda: 0)
    assert wrappers._rows_per_gemm(20, 200, np.float32) == 0


@pytest.mark.parametrize("batch", [20, 23])
@pytest.mark.parametrize("packed", [True, False])
def test_chunked_gemms_give_the_same_bits_on_any_thread_count(monkeypatch, batch, packed):
    # the BLAS: chunks of 8 rows, and thread blocks made of whole chunks, so every chunk is the same BLAS
    # call on one thread or two; where W_hh is packed (AVX-512), the packed GEMM instead
    monkeypatch.setattr(native, "small_gemm_macs", lambda: 4 * 200 * 200 * 9)
    if not packed:
        monkeypatch.setattr(native, "packed_gemm_available", lambda: False)
    gates_x, h0, c0, w_hh, (d_out, dh_n, dc_n) = _lstm_inputs(3, batch, 200, np.float32, seed=4)
    results = []
    for n in (1, 2):
        before = threads.get_num_threads()
        threads.set_num_threads(n)
        try:
            monkeypatch.setattr(wrappers, "MIN_MACS_PER_BLOCK", 1)            # split even this small layer
            fwd = wrappers.lstm_layer_forward(np, gates_x.copy(), h0, c0, w_hh)
            results.append(fwd + wrappers.lstm_layer_backward(np, d_out, dh_n, dc_n, *fwd[2:4], *fwd[:2], h0, c0,
                                                               w_hh))
        finally:
            threads.set_num_threads(before)
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)
    expected = kernels_numpy.lstm_layer_forward(np, gates_x.copy(), h0, c0, w_hh)
    _assert_all_close(results[0][:4], expected, np.float32)


def test_lstm_matches_float64_math_to_float32_rounding():
    """The float32 kernels against the float64 ones on the same inputs: each is as close to exact as the
    NumPy float32 kernels are (so the compiled path loses no accuracy of its own)."""
    gates_x, h0, c0, w_hh, _ = _lstm_inputs(20, 8, 64, np.float64, seed=5)
    exact = wrappers.lstm_layer_forward(np, gates_x.copy(), h0, c0, w_hh)
    as32 = [a.astype(np.float32) for a in (gates_x, h0, c0, w_hh)]
    compiled = wrappers.lstm_layer_forward(np, as32[0].copy(), *as32[1:])
    reference = kernels_numpy.lstm_layer_forward(np, as32[0].copy(), *as32[1:])
    for k in range(4):
        compiled_error = np.abs(compiled[k] - exact[k]).max()
        reference_error = np.abs(reference[k] - exact[k]).max()
        assert compiled_error <= 2 * reference_error + 1e-6, (k, compiled_error, reference_error)


# ---- exp and tanh, through the kernels that use them --------------------------------------------------

def _ulps(got, exact):
    """|got - exact| in units of the float32 spacing at exact (exact: float64)."""
    spacing = np.spacing(np.abs(exact).astype(np.float32)).astype(np.float64)
    return np.abs(got.astype(np.float64) - exact) / spacing


def test_exp_is_within_one_ulp():
    x = np.linspace(-87.3, 0, 200_001, dtype=np.float32)
    logits = np.stack([np.zeros_like(x), x], axis=1)        # row max 0: exp[:, 1] = exp(x - 0) = exp(x)
    _, (exp, _) = wrappers.cross_entropy_forward(np, logits, np.zeros(len(x), np.int64), -100, keep_softmax=True)
    assert _ulps(exp[:, 1], np.exp(x.astype(np.float64))).max() <= 1.0


def test_tanh_is_within_two_ulp():
    x = np.linspace(-12, 12, 100_001, dtype=np.float32)
    gates = np.zeros((1, len(x), 4), np.float32)
    gates[0, :, 2] = x                                     # hidden 1: the g gate is tanh(x), written to acts
    zeros = np.zeros((len(x), 1), np.float32)
    _, _, acts, _ = wrappers.lstm_layer_forward(np, gates, zeros, zeros, np.zeros((4, 1), np.float32))
    assert _ulps(acts[0, :, 2], np.tanh(x.astype(np.float64))).max() <= 2.0


def test_exp_and_tanh_limits_and_nan():
    logits = np.array([[0, -200, -np.inf, 1], [0, np.nan, 1, 2], [0, np.inf, 1, 2]], np.float32)
    losses, (exp, _) = wrappers.cross_entropy_forward(np, logits, np.array([0, 0, 0]), -100, keep_softmax=True)
    assert exp[0, 1] == 0 and exp[0, 2] == 0 and np.isnan(exp[1, 1])
    assert np.isnan(exp[2, 1]) and not exp[2, [0, 2, 3]].any() and np.isnan(losses[2])  # inf - inf; -inf
    x = np.array([-np.inf, -50, 50, np.inf, np.nan, 0.0], np.float32)
    gates = np.zeros((1, len(x), 4), np.float32)
    gates[0, :, 2] = x
    zeros = np.zeros((len(x), 1), np.float32)
    g = wrappers.lstm_layer_forward(np, gates, zeros, zeros, np.zeros((4, 1), np.float32))[2][0, :, 2]
    np.testing.assert_array_equal(g[:4], [-1, -1, 1, 1])
    assert np.isnan(g[4]) and g[5] == 0


# ---- cross-entropy -------------------------------------------------------------------------------------

def _ce_inputs(n, classes, dtype, seed=0):
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((n, classes)) * 4).astype(dtype)
    target = rng.integers(0, classes, n)
    target[::7] = -100
    return logits, target, rng.standard_normal(n).astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n,classes", [(400, 10_000), (7, 3), (1, 1), (33, 17)])
def test_cross_entropy_equals_the_numpy_kernels(num_threads, dtype, n, classes):
    logits, target, row_scale = _ce_inputs(n, classes, dtype)
    safe = np.where(target == -100, 0, target)
    for keep in (False, True):
        expected = kernels_numpy.cross_entropy_forward(np, logits, target, -100, keep_softmax=keep)
        got = wrappers.cross_entropy_forward(np, logits, target, -100, keep_softmax=keep)
        np.testing.assert_allclose(got[0], expected[0], **TOL[dtype])
        assert got[0].dtype == dtype and (got[1] is None) == (not keep)
    expected = kernels_numpy.cross_entropy_backward(np, logits, safe, expected[1], row_scale)
    np.testing.assert_allclose(wrappers.cross_entropy_backward(np, logits, safe, got[1], row_scale), expected,
                               **TOL[dtype])
    # backward without forward's pair (a retained graph's second pass) recomputes it
    np.testing.assert_allclose(wrappers.cross_entropy_backward(np, logits, safe, None, row_scale), expected,
                               **TOL[dtype])


def test_cross_entropy_ignored_rows_and_bad_classes():
    logits, target, _ = _ce_inputs(6, 5, np.float32)
    target[:] = [1, -100, 4, 7, -1, 0]                      # 7 and -1: outside [0, 5), never checked here
    losses, _ = wrappers.cross_entropy_forward(np, logits, target, -100)
    assert losses[1] == 0 and np.isnan(losses[3]) and np.isnan(losses[4])
    np.testing.assert_allclose(losses[[0, 2, 5]],
                               kernels_numpy.cross_entropy_forward(np, logits[[0, 2, 5]], target[[0, 2, 5]], -100)[0],
                               **TOL[np.float32])


def test_other_dtypes_and_modules_run_the_reference():
    logits, target, _ = _ce_inputs(5, 4, np.float16)
    np.testing.assert_array_equal(wrappers.cross_entropy_forward(np, logits, target, -100)[0],
                                  kernels_numpy.cross_entropy_forward(np, logits, target, -100)[0])
    gates_x, h0, c0, w_hh, _ = _lstm_inputs(2, 3, 4, np.float32)
    mixed = wrappers.lstm_layer_forward(np, gates_x.copy(), h0.astype(np.float64), c0, w_hh)
    expected = kernels_numpy.lstm_layer_forward(np, gates_x.copy(), h0.astype(np.float64), c0, w_hh)
    for a, b in zip(mixed, expected):
        np.testing.assert_array_equal(a, b)


# ---- the kernel table, the fallback and the switch -----------------------------------------------------

def test_same_names_and_signatures_as_kernels_numpy():
    import inspect

    public = [name for name, f in vars(kernels_numpy).items() if inspect.isfunction(f) and not name.startswith("_")
              and f.__module__ == kernels_numpy.__name__]
    compiled = [name for name, f in vars(wrappers).items() if inspect.isfunction(f) and not name.startswith("_")]
    assert set(compiled) <= set(public)                            # nothing but kernels_numpy's names
    for name in public:                                            # every one of them, compiled or delegated
        assert inspect.signature(getattr(wrappers, name)) == inspect.signature(getattr(kernels_numpy, name)), name
    assert wrappers.ACTIVATIONS is kernels_numpy.ACTIVATIONS and wrappers.sgd_step is kernels_numpy.sgd_step
    with pytest.raises(AttributeError):
        wrappers._by_rows
    assert backend.CPU.kernels is backend.cpu_kernels()


def test_without_the_library_the_reference_runs_and_says_so_once(monkeypatch, capsys):
    monkeypatch.setattr(native, "library", lambda: None)
    monkeypatch.setattr(native, "unavailable_reason", lambda: "not built")
    monkeypatch.setattr(wrappers, "_noted", False)
    logits, target, _ = _ce_inputs(4, 3, np.float32)
    for _ in range(2):
        got = wrappers.cross_entropy_forward(np, logits, target, -100)
    np.testing.assert_array_equal(got[0], kernels_numpy.cross_entropy_forward(np, logits, target, -100)[0])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "compiled CPU kernels unavailable: not built; using the NumPy kernels" in err


def _backend_kernels_in_a_fresh_process(value):
    env = {**__import__("os").environ, native.ENV_VAR: value}
    code = "from disttrain.tensor import backend; print(backend.CPU.kernels.__name__)"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_the_environment_variable_picks_the_table():
    assert _backend_kernels_in_a_fresh_process("numpy").stdout.strip() == "disttrain.tensor.kernels_numpy"
    assert _backend_kernels_in_a_fresh_process("compiled").stdout.strip() == "disttrain.kernels_cpu.wrappers"
    bad = _backend_kernels_in_a_fresh_process("fast")
    assert bad.returncode != 0 and "$DISTTRAIN_CPU_KERNELS must be one of compiled, numpy, got 'fast'" in bad.stderr


def test_a_training_step_uses_the_compiled_kernels(kernel_calls):
    """The public API reaches them: an embedding + LSTM + Linear + cross-entropy step calls each compiled kernel."""
    compiled = {"lstm_layer_forward", "lstm_layer_backward", "cross_entropy_forward", "cross_entropy_backward",
                "linear_forward", "index_add_rows"}
    called = kernel_calls(*compiled)
    dt.manual_seed(0)
    embedding, lstm, decoder = dt.nn.Embedding(7, 3), dt.nn.LSTM(3, 4), dt.nn.Linear(4, 5)
    out, _ = lstm(embedding(dt.tensor(np.arange(12).reshape(6, 2) % 7)))
    dt.nn.functional.cross_entropy(decoder(out.reshape((12, 4))), dt.tensor(np.arange(12) % 5)).backward()
    assert set(called) == compiled


# ---- Linear's forward with its bias; the embedding's scatter-add ---------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n,k,f", [(400, 200, 10_000), (3, 5, 7), (1, 1, 1), (33, 700, 65)])
def test_linear_forward_equals_the_numpy_kernel(num_threads, dtype, n, k, f):
    """The GEMM adding onto the bias is the BLAS's own sum plus the bias, as NumPy's product then the add:
    equal to rounding (bit for bit here while the BLAS takes K in one block)."""
    rng = np.random.default_rng(6)
    x, w, bias = (rng.standard_normal(s).astype(dtype) for s in ((n, k), (f, k), (f,)))
    expected = kernels_numpy.linear_forward(np, x, w, bias)
    got = wrappers.linear_forward(np, x, w, bias)
    assert got.dtype == dtype and got.shape == (n, f) and got.flags.c_contiguous
    np.testing.assert_allclose(got, expected, **TOL[dtype])
    np.testing.assert_allclose(wrappers.linear_forward(np, np.asfortranarray(x), w[:, :], bias), expected,
                               **TOL[dtype])
    np.testing.assert_array_equal(wrappers.linear_forward(np, x, w, None), x @ w.T)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_index_add_rows_equals_np_add_at(num_threads, dtype):
    """Each value row added in turn, as np.add.at does: bit for bit, repeated and negative indices included,
    on one block of columns or (2 threads: 600,000 values) two."""
    rng = np.random.default_rng(7)
    index = rng.integers(-50, 50, (40, 50))
    index[0, :3] = [4, 4, -46]                                     # 4 and -46 are one row of 50
    values = rng.standard_normal((40, 50, 301)).astype(dtype)
    start = rng.standard_normal((50, 301)).astype(dtype)
    got, expected = start.copy(), start.copy()
    wrappers.index_add_rows(np, got, index, values)
    np.add.at(expected, index, values)
    np.testing.assert_array_equal(got, expected)
    reference = start.copy()
    kernels_numpy.index_add_rows(np, reference, index, values)
    np.testing.assert_allclose(got, reference, **TOL[dtype])


def test_index_add_rows_refuses_an_index_out_of_range_before_adding():
    target = np.zeros((5, 3), np.float32)
    for bad in (5, -6):
        with pytest.raises(IndexError, match=f"index {bad} is out of bounds for axis 0 with size 5"):
            wrappers.index_add_rows(np, target, np.array([0, bad]), np.ones((2, 3), np.float32))
        assert not target.any()


# ---- the forward recurrence on a packed W_hh ------------------------------------------------------------

@pytest.mark.skipif(not native.packed_gemm_available(), reason="the packed recurrent GEMM needs an AVX-512 CPU")
@pytest.mark.parametrize("steps,batch,hidden", [(20, 20, 200), (3, 7, 45), (2, 3, 300), (4, 1, 1), (3, 13, 40),
                                               (2, 32, 64), (2, 27, 40)])
def test_packed_forward_equals_the_blas_forward(num_threads, monkeypatch, steps, batch, hidden):
    """Own GEMM on the packed W_hh against the BLAS's: batch rows in even blocks of at most 12 (20: 10 + 10,
    27: 9 + 9 + 9, 32: 11 + 11 + 10; on two threads 10: one block, 16: 8 + 8, 14: 7 + 7), a last panel
    narrower than 32 columns, K = H sliced when over 256 (hidden 300)."""
    gates_x, h0, c0, w_hh, _ = _lstm_inputs(steps, batch, hidden, np.float32, seed=8)
    packed = wrappers.lstm_layer_forward(np, gates_x.copy(), h0, c0, w_hh)
    monkeypatch.setattr(native, "packed_gemm_available", lambda: False)
    blas = wrappers.lstm_layer_forward(np, gates_x.copy(), h0, c0, w_hh)
    _assert_all_close(packed, blas, np.float32)
    _assert_all_close(packed, kernels_numpy.lstm_layer_forward(np, gates_x.copy(), h0, c0, w_hh), np.float32)


@pytest.mark.skipif(not native.packed_gemm_available(), reason="the packed recurrent GEMM needs an AVX-512 CPU")
@pytest.mark.parametrize("batch", [27, 32])
def test_packed_forward_has_the_same_bits_whatever_the_row_blocks(monkeypatch, batch):
    """Each output is one chain of multiply-adds over k, whichever block of rows (1 thread: 27 as 9 + 9 + 9;
    2 threads: 7 + 7 and 7 + 6) computed it."""
    monkeypatch.setattr(wrappers, "MIN_MACS_PER_BLOCK", 1)           # split even this small layer
    gates_x, h0, c0, w_hh, _ = _lstm_inputs(3, batch, 40, np.float32, seed=10)
    results = []
    for n in (1, 2):
        before = threads.get_num_threads()
        threads.set_num_threads(n)
        try:
            assert len(threads.row_blocks(batch, 1, 1)) == n           # the batch is split n ways
            results.append(wrappers.lstm_layer_forward(np, gates_x.copy(), h0, c0, w_hh))
        finally:
            threads.set_num_threads(before)
    for one_thread, two_threads in zip(*results):
        np.testing.assert_array_equal(one_thread, two_threads)


@pytest.mark.skipif(not native.packed_gemm_available(), reason="the packed recurrent GEMM needs an AVX-512 CPU")
@pytest.mark.parametrize("steps,batch,hidden", [(20, 20, 200), (3, 7, 45), (2, 3, 300), (4, 1, 1), (3, 13, 40),
                                               (2, 32, 64), (2, 27, 40)])
def test_packed_backward_equals_the_blas_backward(num_threads, monkeypatch, steps, batch, hidden):
    """The backward's d_pre @ W_hh on W_hh packed (the BLAS's small-matrix kernels made too small for the
    shape, as for the char LM's H = 256) against the BLAS's: a last panel narrower than 32 columns (H = 45,
    300), K = 4H sliced in 256-row pieces."""
    gates_x, h0, c0, w_hh, (d_out, dh_n, dc_n) = _lstm_inputs(steps, batch, hidden, np.float32, seed=9)
    out, cs, acts, tanh_c = wrappers.lstm_layer_forward(np, gates_x, h0, c0, w_hh)
    args = (d_out, dh_n, dc_n, acts, tanh_c, out, cs, h0, c0, w_hh)
    packs = []
    real_pack = wrappers._packed_recurrent_weight
    monkeypatch.setattr(wrappers, "_packed_recurrent_weight", lambda *a, **k: packs.append(k) or real_pack(*a, **k))
    monkeypatch.setattr(native, "small_gemm_macs", lambda: 0)
    packed = wrappers.lstm_layer_backward(np, *args)
    assert packs == [{"transposed": False}]                         # it did run on the packed W_hh
    monkeypatch.setattr(native, "packed_gemm_available", lambda: False)
    _assert_all_close(packed, wrappers.lstm_layer_backward(np, *args), np.float32)
    _assert_all_close(packed, kernels_numpy.lstm_layer_backward(np, *args), np.float32)
