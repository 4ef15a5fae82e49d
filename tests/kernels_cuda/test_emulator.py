"""The CPU kernel emulator (disttrain.kernels_cuda.emulator) runs CUDA code faithfully and refuses
what a GPU would hang on or misread, so that test_kernels_against_reference.py's "emulated" runs
mean something.

  - common.cuh's block and warp reductions give NumPy's sums and log-sum-exps for block sizes of
    1 to 32 warps (they synchronise: the fiber scheduler is exercised);
  - a barrier or shuffle some threads skip, a shuffle in a partial warp: errors naming the block;
  - arguments: wrong count, dtype, a Python number, a strided array, launch limits: errors;
  - reading or writing one element past an array's end: an error naming the argument and element;
  - a kernel with a bug (lstm.cu with two gates swapped) fails the comparison with the reference.
"""
import numpy as np
import pytest

from disttrain.kernels_cuda import emulator, loader, wrappers
from disttrain.tensor import kernels_numpy

pytestmark = pytest.mark.skipif(not emulator.available, reason="the emulator needs a C++ compiler")

PREAMBLE = (loader.SOURCE_DIR / loader.PREAMBLE).read_text()

REDUCTIONS = PREAMBLE + r"""
extern "C" __global__ void block_sums(const double* x, dt_index n, double* out) {
    double* scratch = dt_shared<double>();
    double v = 0.0;
    for (dt_index i = threadIdx.x; i < n; i += blockDim.x) v += x[blockIdx.x * n + i];
    v = dt_block_sum(v, scratch);
    if (threadIdx.x == 0) out[blockIdx.x] = v;
}
extern "C" __global__ void block_lse(const float* x, dt_index n, float* out) {
    float* scratch = dt_shared<float>();
    float m = dt_neg_inf<float>(), s = 0.0f;
    for (dt_index i = threadIdx.x; i < n; i += blockDim.x) dt_lse_add(m, s, x[blockIdx.x * n + i]);
    dt_block_lse(m, s, scratch);
    if (threadIdx.x == 0) out[blockIdx.x] = m + logf(s);
}
"""

FAULTY = PREAMBLE + r"""
extern "C" __global__ void barrier_in_branch(float* x) {
    if (threadIdx.x < 16) __syncthreads();
    x[threadIdx.x] = 1.0f;
}
extern "C" __global__ void shuffle_in_branch(float* x) {
    float v = x[threadIdx.x];
    if (threadIdx.x % 2) v = __shfl_xor_sync(0xffffffffu, v, 1);
    x[threadIdx.x] = v;
}
extern "C" __global__ void warp_sum(float* x) { x[threadIdx.x] = dt_warp_sum(x[threadIdx.x]); }
"""


@pytest.fixture(scope="module")
def reductions():
    return emulator.Library(REDUCTIONS, ["block_sums", "block_lse"], label="test-reductions")


@pytest.fixture(scope="module")
def faulty():
    return emulator.Library(FAULTY, ["barrier_in_branch", "shuffle_in_branch", "warp_sum"], label="test-faulty")


@pytest.mark.parametrize("block", [32, 64, 96, 256, 1024])
@pytest.mark.parametrize("n", [1, 31, 1000])
def test_block_reductions_match_numpy(reductions, block, n):
    rows = 3
    x = np.random.default_rng(n).standard_normal((rows, n))
    out = np.zeros(rows)
    reductions.kernel("block_sums")((rows,), (block,), (x, np.int64(n), out), shared_mem=8 * block // 32)
    np.testing.assert_allclose(out, x.sum(axis=1), rtol=1e-12, atol=1e-12)
    x32 = (x * 30).astype(np.float32)
    x32[0, 0] = -np.inf  # an empty share must not turn the result into NaN
    lse = np.zeros(rows, np.float32)
    reductions.kernel("block_lse")((rows,), (block,), (x32, np.int64(n), lse), shared_mem=2 * 4 * block // 32)
    with np.errstate(divide="ignore"):  # n = 1: row 0 holds only -inf, its log-sum-exp is -inf
        expected = np.log(np.exp(x32.astype(np.float64)).sum(axis=1))
    np.testing.assert_allclose(lse, expected, rtol=1e-6)


def test_warp_shuffles_exchange_lanes(faulty):
    x = np.arange(64, dtype=np.float32)
    faulty.kernel("warp_sum")((1,), (64,), (x,))
    np.testing.assert_array_equal(x, [sum(range(32))] * 32 + [sum(range(32, 64))] * 32)


def test_a_barrier_some_threads_skip_is_an_error(faulty):
    with pytest.raises(RuntimeError, match=r"__syncthreads reached by 16 of 64 threads.*block \(0, 0, 0\)"):
        faulty.kernel("barrier_in_branch")((1,), (64,), (np.zeros(64, np.float32),))


def test_a_shuffle_some_lanes_skip_is_an_error(faulty):
    with pytest.raises(RuntimeError, match="warp 0: __shfl_xor_sync reached by 16 of 32 lanes"):
        faulty.kernel("shuffle_in_branch")((1,), (32,), (np.zeros(32, np.float32),))


def test_a_shuffle_in_a_partial_warp_is_an_error(faulty):
    with pytest.raises(RuntimeError, match="partial warp of 16 lanes"):
        faulty.kernel("warp_sum")((1,), (48,), (np.zeros(48, np.float32),))


def test_arguments_are_checked_against_the_c_parameters():
    k = emulator.kernel("bucket", "copy_scaled", np.float32)
    src, dst = np.ones(4, np.float32), np.zeros(4, np.float32)
    good = (src, dst, np.int64(4), np.float32(2.0), np.int32(1))
    k((1,), (32,), good)
    np.testing.assert_array_equal(dst, 2.0)
    cases = [
        ((src, dst, np.int64(4), 2.0, np.int32(1)), TypeError, "argument 3 .*NumPy float32 scalar, got float"),
        ((src, dst, np.int32(4), np.float32(2), np.int32(1)), TypeError, "argument 2 .*int64 scalar, got int32"),
        ((src.astype(np.float64), dst, np.int64(4), np.float32(2), np.int32(1)), TypeError, "array of float64"),
        ((np.ones((4, 2), np.float32)[:, 0], dst, np.int64(4), np.float32(2), np.int32(1)), ValueError,
         "not C-contiguous"),
        (good[:4], TypeError, "4 arguments for 5 parameters"),
    ]
    for args, error, message in cases:
        with pytest.raises(error, match=message):
            k((1,), (32,), args)
    with pytest.raises(RuntimeError, match="block of 2048 threads"):
        k((1,), (2048,), good)
    with pytest.raises(RuntimeError, match="outside CUDA's limits"):
        k((1, 70_000), (32,), good)


def test_a_kernel_bug_fails_the_comparison_with_the_reference(monkeypatch):
    """lstm.cu with the input and forget gates swapped in the cell update: the wrapper's output differs."""
    good_line = "const T cn = f * c[k] + i * g;"
    code = loader.source_text("lstm")
    assert code.count(good_line) == 1
    mutated = emulator.Library(code.replace(good_line, "const T cn = i * c[k] + f * g;"),
                               emulator.kernel_names("lstm"), label="test-lstm-mutated")
    rng = np.random.default_rng(0)
    gates_x, h, c = rng.standard_normal((3, 8)), rng.standard_normal((3, 2)), rng.standard_normal((3, 2))
    w_hh = rng.standard_normal((8, 2))
    expected = kernels_numpy.lstm_cell_forward(np, gates_x, h, c, w_hh)
    monkeypatch.setattr(wrappers, "kernel", emulator.kernel)
    for got, ref in zip(wrappers.lstm_cell_forward(np, gates_x, h, c, w_hh), expected):
        np.testing.assert_allclose(got, ref, rtol=1e-12)
    monkeypatch.setattr(wrappers, "kernel", lambda source, name, dtype=None:
                        mutated.kernel(loader.symbol(source, name, dtype)))
    h_new = wrappers.lstm_cell_forward(np, gates_x, h, c, w_hh)[0]
    assert not np.allclose(h_new, expected[0])


OUT_OF_BOUNDS = PREAMBLE + r"""
extern "C" __global__ void shift_left(const float* x, float* y, dt_index n) {
    DT_FOR_EACH(i, n) y[i] = x[i + 1];  // reads one element past the end of x
}
extern "C" __global__ void fill(float* y, dt_index n) {
    DT_FOR_EACH(i, n + 1) y[i] = 1.0f;  // writes one element past the end of y
}
"""


@pytest.mark.parametrize("n", [1, 1024, 1000])
def test_reading_or_writing_past_an_array_is_an_error(n):
    lib = emulator.Library(OUT_OF_BOUNDS, ["shift_left", "fill"], label="test-out-of-bounds")
    x, y = np.arange(n, dtype=np.float32), np.zeros(n, np.float32)
    with pytest.raises(RuntimeError, match=rf"memory fault .*argument 0: element {n} of an array of {n}"):
        lib.kernel("shift_left")((4,), (256,), (x, y, np.int64(n)))
    with pytest.raises(RuntimeError, match=rf"memory fault .*argument 0: element {n} of an array of {n}"):
        lib.kernel("fill")((4,), (256,), (y, np.int64(n)))
    assert not y.any()  # a failed launch writes nothing back


def test_outputs_are_written_back_and_a_shared_buffer_stays_one():
    k = emulator.kernel("bucket", "copy_scaled", np.float64)
    buf = np.arange(6.0)
    k((1,), (32,), (buf, buf, np.int64(6), np.float64(3.0), np.int32(1)))  # in place: src and dst the same
    np.testing.assert_array_equal(buf, np.arange(6.0) * 3)
    whole = np.arange(8.0)
    k((1,), (32,), (whole[:6], whole[2:], np.int64(6), np.float64(1.0), np.int32(0)))  # overlapping views
    # they ran on the original memory, threads in order (thread i reads what thread i - 2 wrote); on
    # copies the result would be 0, 1, 0, 1, 2, 3, 4, 5
    assert whole.tolist() == [0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0]
