"""The CPU backend's kernel table with the compiled hot paths: kernels_numpy's names and signatures, the
LSTM layer, the cross-entropy, Linear's forward, the row scatter-add, the Transformer's GELU, softmax and
LayerNorm and the multi-tensor norms, scale_, foreach_sgd_step and foreach_adam_step running native.cpp,
scaled dot-product attention running attention.cpp, everything else kernels_numpy's own function.

Each wrapper makes its inputs C-contiguous (attention's: their rows), allocates the outputs and calls the
compiled kernel once with its row blocks (disttrain.tensor.threads.row_blocks: one per intra-op thread worth
its hand-off), which the kernel runs side by side on the intra-op threads of C++ (the row-block team,
team.cpp), not through Python's thread pool: the LSTM over blocks of the batch, with the BLAS held to one
thread while the blocks run (each block calls it for its own rows; two levels of threads on two cores would
only queue for them), the cross-entropy, softmax and LayerNorm over blocks of rows, attention over blocks of
(batch, head) problems, the GELU and the multi-tensor passes over blocks of elements. Where no compiled kernel
applies (another array module or dtype, empty arrays, the library not built) the wrapper runs the NumPy
reference; a missing library is reported once, in one line, on stderr."""
import sys
import types

import numpy as np

from disttrain.kernels_cpu import native
from disttrain.tensor import kernels_numpy as _ref
from disttrain.tensor import layout, threads

# A batch block of the recurrence is worth a thread hand-off (tens of microseconds) from about this many
# multiply-adds of its GEMMs (a few hundred microseconds of work).
MIN_MACS_PER_BLOCK = 1 << 22

# Rows per recurrent GEMM call where the BLAS has unpacked small-matrix kernels: a multiple of 4 under its
# bound. OpenBLAS's SkylakeX kernels run 4-row calls fastest per row, faster than odd sizes or one packed
# call over the whole block (the timings are in benchmarks/RESULTS.md, compiled CPU kernels)
SMALL_GEMM_ROWS = 4

_noted = False


def _compiled(xp, *arrays):
    """The compiled library when it applies to these arrays (NumPy, one float dtype it is built for, no
    empty array), else None."""
    if xp is not np or any(a.dtype != arrays[0].dtype or a.size == 0 for a in arrays):
        return None
    if arrays[0].dtype not in native.SUFFIX:
        return None
    lib = native.library()
    if lib is None:
        _note_fallback()
    return lib


def _note_fallback():
    global _noted
    if not _noted:
        _noted = True
        print(f"disttrain: compiled CPU kernels unavailable: {native.unavailable_reason()}; using the NumPy "
              "kernels (slower)", file=sys.stderr)


def _kernel(lib, name, dtype):
    return getattr(lib, f"dt_{name}_{native.SUFFIX[dtype]}")


def _pointers(*arrays):
    """The data addresses of C-contiguous arrays (None for None). The caller keeps the arrays alive."""
    return [None if a is None else a.ctypes.data for a in arrays]


def _c(a, dtype=None):
    return np.ascontiguousarray(a, dtype=dtype)


class _Blocks:
    """A kernel's row blocks as its last arguments take them: `bounds` (the address of lo_0, lo_1, ..., rows, an
    int64 array this object keeps alive) and `count`. The kernel runs block i on the row-block team's thread i
    (team.cpp), block 0 on the calling thread."""

    __slots__ = ("array", "bounds", "count")

    def __init__(self, blocks, rows):
        self.array = np.array([lo for lo, _ in blocks] + [rows], dtype=np.int64)
        self.bounds = self.array.ctypes.data
        self.count = len(blocks)


def _blocks(rows, elements_per_row, min_per_block=threads.MIN_ELEMENTS_PER_THREAD):
    """Blocks of range(rows) for the threads (threads.row_blocks' policy), as a kernel takes them."""
    return _Blocks(threads.row_blocks(rows, elements_per_row, min_per_block), rows)


def _rows_per_gemm(batch, hidden, dtype, packed=None):
    """Rows per recurrent BLAS call of the compiled LSTM: 0 for one call per batch block (or no BLAS call:
    a packed W_hh), else a multiple of SMALL_GEMM_ROWS small enough for the BLAS's unpacked small-matrix
    kernels (native.small_gemm_macs). Both directions multiply by a (H, 4H) or (4H, H) matrix, so one count
    serves forward and backward."""
    if packed is not None:
        return 0
    most = _small_gemm_rows(hidden, dtype)
    rows = most - most % SMALL_GEMM_ROWS
    return rows if 0 < rows < batch else 0


def _small_gemm_rows(hidden, dtype):
    """The most rows of a recurrent GEMM that the BLAS's unpacked small-matrix kernels take (float32 only)."""
    return native.small_gemm_macs() // (4 * hidden * hidden) if dtype == np.float32 else 0


def _recurrence(kernel, args, batch, macs_per_row, chunk):
    """kernel(*args, bounds, count, chunk) once, over blocks of batch rows side by side, the BLAS on one
    thread. With chunk > 0 every block is made of whole chunks, so each chunk's GEMMs are the same calls
    whatever the thread count, and so are the results."""
    if chunk:
        units = threads.row_blocks(-(-batch // chunk), macs_per_row * chunk, MIN_MACS_PER_BLOCK)
        blocks = _Blocks([(lo * chunk, min(hi * chunk, batch)) for lo, hi in units], batch)
    else:
        blocks = _blocks(batch, macs_per_row, MIN_MACS_PER_BLOCK)
    with threads.one_blas_thread():
        kernel(*args, blocks.bounds, blocks.count, chunk)


def _packed_recurrent_weight(lib, w_hh, transposed):
    """W_hh (4H, H) packed for the compiled recurrence's own GEMMs (native.cpp, dt_pack_panels): its
    transpose for the forward's h @ W_hh^T, W_hh itself for the backward's d_pre @ W_hh. None where the
    BLAS runs them (float64, a CPU without AVX-512)."""
    if w_hh.dtype != np.float32 or not native.packed_gemm_available():
        return None
    w = _c(w_hh)
    four_h, hidden = w.shape
    k, n, row_stride, col_stride = (hidden, four_h, 1, hidden) if transposed else (four_h, hidden, hidden, 1)
    packed = np.empty(lib.dt_packed_size(k, n), dtype=np.float32)
    lib.dt_pack_panels(w.ctypes.data, k, n, row_stride, col_stride, packed.ctypes.data)
    return packed


# ---- LSTM layer --------------------------------------------------------------------------------------

def lstm_layer_forward(xp, gates_x, h0, c0, w_hh):
    """kernels_numpy.lstm_layer_forward (same arguments, results and consumed gates_x), compiled."""
    lib = _compiled(xp, gates_x, h0, c0, w_hh)
    if lib is None:
        return _ref.lstm_layer_forward(xp, gates_x, h0, c0, w_hh)
    steps, batch, four_h = gates_x.shape
    hidden = four_h // 4
    acts = _c(gates_x)
    if not acts.flags.writeable:  # the activations are written into its buffer: never into read-only memory
        acts = acts.copy()
    out, cs, tanh_c = (np.empty((steps, batch, hidden), dtype=acts.dtype) for _ in range(3))
    packed = _packed_recurrent_weight(lib, w_hh, transposed=True)
    # else W_hh^T copied contiguous once per call: one-thread OpenBLAS GEMMs on the transposed view of W_hh
    # are much slower for these shapes (measured in benchmarks/RESULTS.md)
    w_t = _c(w_hh.T) if packed is None else None
    arrays = (acts, _c(h0), _c(c0), w_t, packed, out, cs, tanh_c)
    args = (*_pointers(*arrays), steps, batch, hidden)
    _recurrence(_kernel(lib, "lstm_forward", acts.dtype), args, batch, steps * four_h * hidden,
                _rows_per_gemm(batch, hidden, acts.dtype, packed))
    return out, cs, acts, tanh_c


def lstm_layer_backward(xp, d_out, dh_n, dc_n, acts, tanh_c, out, cs, h0, c0, w_hh):
    """kernels_numpy.lstm_layer_backward, compiled: the recurrence per batch block, then dW_hh as one GEMM
    over all steps on every BLAS thread. Each step's d_pre @ W_hh runs in one call of the BLAS's
    small-matrix kernels where the whole batch fits them; else on W_hh packed once here, where every BLAS
    call would pack (copy) W_hh again (the char LM's H = 256: 1 MB a step) or the batch would be cut into
    small-matrix calls of a few rows (ptb_small's)."""
    lib = _compiled(xp, d_out, dh_n, dc_n, acts, tanh_c, out, cs, h0, c0, w_hh)
    if lib is None:
        return _ref.lstm_layer_backward(xp, d_out, dh_n, dc_n, acts, tanh_c, out, cs, h0, c0, w_hh)
    steps, batch, four_h = acts.shape
    hidden = four_h // 4
    d_gates = np.empty((steps, batch, four_h), dtype=acts.dtype)
    dh0, dc0, dh_step = (np.empty((batch, hidden), dtype=acts.dtype) for _ in range(3))
    small = batch <= _small_gemm_rows(hidden, acts.dtype)
    packed = None if small else _packed_recurrent_weight(lib, w_hh, transposed=False)
    chunk = _rows_per_gemm(batch, hidden, acts.dtype, packed)
    arrays = (_c(d_out), _c(dh_n), _c(dc_n), _c(acts), _c(tanh_c), _c(cs), _c(c0),
              _c(w_hh) if packed is None else None, packed, d_gates, dh0, dc0, dh_step)
    args = (*_pointers(*arrays), steps, batch, hidden)
    _recurrence(_kernel(lib, "lstm_backward", acts.dtype), args, batch, steps * four_h * hidden, chunk)
    return d_gates, dh0, dc0, _ref.recurrent_weight_grad(xp, d_gates, h0, out)


# ---- fused log-softmax + cross-entropy -----------------------------------------------------------------

def cross_entropy_forward(xp, logits, target, ignore_index, keep_softmax=False):
    """kernels_numpy.cross_entropy_forward, compiled: one max pass and one exp-and-sum pass per row."""
    lib = _compiled(xp, logits)
    if lib is None or logits.ndim != 2:
        return _ref.cross_entropy_forward(xp, logits, target, ignore_index, keep_softmax)
    n, classes = logits.shape
    logits, target = _c(logits), _c(target, np.int64)
    exp = np.empty_like(logits) if keep_softmax else None
    sumexp, losses = np.empty(n, dtype=logits.dtype), np.empty(n, dtype=logits.dtype)
    pointers, outputs = _pointers(logits, target), _pointers(exp, sumexp, losses)
    kernel = _kernel(lib, "cross_entropy_forward", logits.dtype)

    blocks = _blocks(n, classes)
    kernel(*pointers, int(ignore_index), *outputs, classes, blocks.bounds, blocks.count)
    return losses, ((exp, sumexp) if keep_softmax else None)


def cross_entropy_backward(xp, logits, target, saved, row_scale):
    """kernels_numpy.cross_entropy_backward, compiled for forward's (exp, sumexp) pair (overwritten with
    the result, as there) and for None (recomputed here); the CUDA form (a row log-sum-exp) goes to the
    reference."""
    lib = _compiled(xp, logits)
    if lib is None or logits.ndim != 2 or not (saved is None or isinstance(saved, tuple)):
        return _ref.cross_entropy_backward(xp, logits, target, saved, row_scale)
    n, classes = logits.shape
    if saved is None:
        saved = cross_entropy_forward(xp, logits, target, -1, keep_softmax=True)[1]
    grad, sumexp = saved
    if not (grad.flags.c_contiguous and grad.dtype == logits.dtype and sumexp.dtype == logits.dtype):
        return _ref.cross_entropy_backward(xp, logits, target, saved, row_scale)
    arrays = (grad, _c(sumexp), _c(row_scale.reshape(n), logits.dtype), _c(target, np.int64))
    args = _pointers(*arrays)
    kernel = _kernel(lib, "cross_entropy_backward", logits.dtype)

    blocks = _blocks(n, classes)
    kernel(*args, classes, blocks.bounds, blocks.count)
    return grad


# ---- GELU (tanh form: the Transformer's; exact form), softmax over the last axis -------------------------

# The compiled GELU is float32's only. Its form x / (1 + exp(-2u)) keeps the digits that the reference's
# 1 + tanh(u) loses where tanh(u) is near -1: a few float32 ulps of difference, but in float64 the
# reference's own rounding of that sum (up to ~1e-12 relative at x = -4) would be the difference, and the
# float64 gradient checks test the reference's formula to 1e-14.

def gelu_forward(xp, x):
    """kernels_numpy.gelu_forward, compiled for float32: one pass, element blocks on the intra-op threads."""
    lib = _compiled(xp, x)
    if lib is None or x.dtype != np.float32:
        return _ref.gelu_forward(xp, x)
    y = np.empty(x.shape, dtype=x.dtype)  # x's shape: ascontiguousarray makes a 0-d array 1-d
    _by_elements(_kernel(lib, "gelu_forward", x.dtype), x.size, _c(x), y)
    return y


def gelu_backward(xp, grad_y, x):
    """kernels_numpy.gelu_backward, compiled for float32: one pass recomputing the activation from x."""
    lib = _compiled(xp, grad_y, x)
    if lib is None or x.dtype != np.float32 or grad_y.shape != x.shape:
        return _ref.gelu_backward(xp, grad_y, x)
    grad_x = np.empty(x.shape, dtype=x.dtype)
    _by_elements(_kernel(lib, "gelu_backward", x.dtype), x.size, _c(grad_y), _c(x), grad_x)
    return grad_x


def gelu_erf_forward(xp, x):
    """kernels_numpy.gelu_erf_forward, compiled (libm's erfc): one pass, element blocks on the intra-op threads."""
    lib = _compiled(xp, x)
    if lib is None:
        return _ref.gelu_erf_forward(xp, x)
    y = np.empty(x.shape, dtype=x.dtype)
    _by_elements(_kernel(lib, "gelu_erf_forward", x.dtype), x.size, _c(x), y)
    return y


def gelu_erf_backward(xp, grad_y, x):
    """kernels_numpy.gelu_erf_backward, compiled: one pass recomputing Phi(x) from x."""
    lib = _compiled(xp, grad_y, x)
    if lib is None or grad_y.shape != x.shape:
        return _ref.gelu_erf_backward(xp, grad_y, x)
    grad_x = np.empty(x.shape, dtype=x.dtype)
    _by_elements(_kernel(lib, "gelu_erf_backward", x.dtype), x.size, _c(grad_y), _c(x), grad_x)
    return grad_x


def softmax_forward(xp, x, causal=False):
    """kernels_numpy.softmax_forward, compiled: one visit of each row (max, exp and sum, scale), rows on
    the intra-op threads; a causal row reads only its kept entries."""
    lib = _compiled(xp, x)
    if lib is None or x.ndim < (2 if causal else 1):
        return _ref.softmax_forward(xp, x, causal)
    x = _c(x)
    y = np.empty_like(x)
    n = x.shape[-1]
    queries = x.shape[-2] if causal else 1
    args = _pointers(x, y)
    kernel = _kernel(lib, "softmax_forward", x.dtype)
    blocks = _blocks(x.size // n, n)
    kernel(*args, n, queries, int(causal), blocks.bounds, blocks.count)
    return y


def softmax_backward(xp, grad_y, y):
    """kernels_numpy.softmax_backward, compiled: each row's dot product and gradient in one visit."""
    lib = _compiled(xp, grad_y, y)
    if lib is None or y.ndim == 0 or grad_y.shape != y.shape:
        return _ref.softmax_backward(xp, grad_y, y)
    y = _c(y)
    grad_x = np.empty_like(y)
    n = y.shape[-1]
    arrays = (_c(grad_y), y, grad_x)  # kept alive through the call: _c may copy
    args = _pointers(*arrays)
    kernel = _kernel(lib, "softmax_backward", y.dtype)
    blocks = _blocks(y.size // n, n)
    kernel(*args, n, blocks.bounds, blocks.count)
    return grad_x


def layer_norm_forward(xp, x, weight, bias, eps):
    """kernels_numpy.layer_norm_forward, compiled: one visit of each row (mean, variance, output), rows on
    the intra-op threads."""
    lib = _compiled(xp, *(a for a in (x, weight, bias) if a is not None))
    if lib is None or x.ndim != 2 or any(a is not None and a.shape != x.shape[1:] for a in (weight, bias)):
        return _ref.layer_norm_forward(xp, x, weight, bias, eps)
    rows, n = x.shape
    x, weight, bias = (None if a is None else _c(a) for a in (x, weight, bias))
    y = np.empty_like(x)
    mean, rstd = np.empty(rows, dtype=x.dtype), np.empty(rows, dtype=x.dtype)
    inputs, outputs = _pointers(x, weight, bias), _pointers(y, mean, rstd)
    kernel = _kernel(lib, "layer_norm_forward", x.dtype)
    blocks = _blocks(rows, n)
    kernel(*inputs, float(eps), *outputs, n, blocks.bounds, blocks.count)
    return y, mean, rstd


# Rows per partial column sum of the LayerNorm weight and bias gradients: the sums are made per chunk and the
# chunks' sums added in NumPy, so the result does not depend on how the rows were split over the threads
LAYER_NORM_CHUNK = 64


def layer_norm_backward(xp, grad_y, x, weight, mean, rstd, with_bias=False):
    """kernels_numpy.layer_norm_backward, compiled: grad_x with each row's two sums in one visit of the row,
    the weight and bias gradients as partial column sums over chunks of rows."""
    lib = _compiled(xp, *(a for a in (grad_y, x, weight, mean, rstd) if a is not None))
    if (lib is None or x.ndim != 2 or grad_y.shape != x.shape or x.shape[:1] != mean.shape or x.shape[:1] != rstd.shape
            or (weight is not None and weight.shape != x.shape[1:])):
        return _ref.layer_norm_backward(xp, grad_y, x, weight, mean, rstd, with_bias)
    rows, n = x.shape
    chunks = -(-rows // LAYER_NORM_CHUNK)
    grad_x = np.empty(x.shape, dtype=x.dtype)
    weight_sums = np.empty((chunks, n), dtype=x.dtype) if weight is not None else None
    bias_sums = np.empty((chunks, n), dtype=x.dtype) if with_bias else None
    arrays = (_c(grad_y), _c(x), None if weight is None else _c(weight), _c(mean), _c(rstd), grad_x, weight_sums,
              bias_sums)  # kept alive through the call: _c may copy
    args = _pointers(*arrays)
    kernel = _kernel(lib, "layer_norm_backward", x.dtype)
    blocks = _blocks(chunks, LAYER_NORM_CHUNK * n)
    kernel(*args, rows, n, LAYER_NORM_CHUNK, blocks.bounds, blocks.count)
    return (grad_x, None if weight_sums is None else weight_sums.sum(axis=0),
            None if bias_sums is None else bias_sums.sum(axis=0))


def _by_elements(kernel, size, *arrays):
    """kernel(*pointers, blocks) over element blocks of C-contiguous arrays, side by side."""
    blocks = _blocks(size, 1)
    kernel(*_pointers(*arrays), blocks.bounds, blocks.count)


# ---- scaled dot-product attention ----------------------------------------------------------------------

def attention_forward(xp, q, k, v, scale, causal):
    """kernels_numpy.attention_forward, compiled (attention.cpp): each problem (a leading index) whole on one
    thread, its scores and probabilities in the cache; q, k and v may be strided views (rows contiguous), and
    the output takes q's axis order, so a view of a projection's output goes in and out without a copy."""
    lib = _compiled(xp, q, k, v)
    if lib is None or not _attention_shapes_fit(q, k, v):
        return _ref.attention_forward(xp, q, k, v, scale, causal)
    out = _empty_in_layout_of(q, q.shape[:-1] + v.shape[-1:])
    lse = np.empty(q.shape[:-1], dtype=q.dtype)
    strided = _Matrices(q, k, v, out)
    blocks = _attention_blocks(strided.problems, q, k, v)
    dims = _attention_dims(q, k, v)  # kept alive through the call, as every array the kernel reads
    _kernel(lib, "attention_forward", q.dtype)(
        *strided.pointers, lse.ctypes.data, strided.offsets_pointer, strided.rows_pointer, strided.problems,
        dims.ctypes.data, float(scale), int(causal), blocks.bounds, blocks.count)
    return out, lse


def attention_backward(xp, grad_out, q, k, v, out, saved, scale, causal):
    """kernels_numpy.attention_backward, compiled: each problem's probabilities recomputed from the row
    log-sum-exp (`saved`), its dK and dV summed in the thread's cache; the gradients take q's, k's and v's
    axis orders."""
    lse = saved
    lib = _compiled(xp, grad_out, q, k, v, out, lse)
    if lib is None or not _attention_shapes_fit(q, k, v) or grad_out.shape != out.shape or lse.shape != q.shape[:-1]:
        return _ref.attention_backward(xp, grad_out, q, k, v, out, lse, scale, causal)
    grads = tuple(_empty_in_layout_of(a, a.shape) for a in (q, k, v))
    strided = _Matrices(q, k, v, out, grad_out, *grads)
    lse = _c(lse)
    blocks = _attention_blocks(strided.problems, q, k, v)
    dims = _attention_dims(q, k, v)
    q_, k_, v_, out_, grad_out_, dq, dk, dv = strided.pointers
    _kernel(lib, "attention_backward", q.dtype)(
        q_, k_, v_, out_, lse.ctypes.data, grad_out_, dq, dk, dv, strided.offsets_pointer, strided.rows_pointer,
        strided.problems, dims.ctypes.data, float(scale), int(causal), blocks.bounds, blocks.count)
    return grads


def _attention_shapes_fit(q, k, v):
    return (q.ndim >= 2 and q.ndim == k.ndim == v.ndim and q.shape[:-2] == k.shape[:-2] == v.shape[:-2]
            and q.shape[-1] == k.shape[-1] and k.shape[-2] == v.shape[-2])


def _attention_dims(q, k, v):
    return np.array([q.shape[-2], k.shape[-2], q.shape[-1], v.shape[-1]], dtype=np.int64)


def _attention_blocks(problems, q, k, v):
    """Blocks of problems, each problem worth its multiply-adds (L S (E + Ev) each way)."""
    return _blocks(problems, q.shape[-2] * k.shape[-2] * (q.shape[-1] + v.shape[-1]), MIN_MACS_PER_BLOCK)


def _empty_in_layout_of(a, shape):
    """An uninitialised array of `shape` (a's number of axes) laid out in memory as a is: the output or gradient
    of a transposed view then transposes back (to a projection's rows) without a copy."""
    return layout.empty_in_order(np, shape, a.dtype, layout.axis_order(a))


class _Matrices:
    """Arrays (..., rows, cols) with the same leading axes as attention.cpp's Strided takes them: `pointers`
    (each array's first element), `offsets_pointer` (per array, its matrices' element offsets, one per
    leading index), `rows_pointer` (per array, its row stride in elements) and `problems` (the leading
    indices). An input whose rows are not contiguous, or whose strides are negative, is copied first (the
    outputs the wrappers allocate never are); the object keeps every array it points at alive."""

    def __init__(self, *arrays):
        self.arrays = [self._rows_contiguous(a) for a in arrays]
        self.problems = int(np.prod(arrays[0].shape[:-2], dtype=np.int64))
        self.pointers = _pointers(*self.arrays)
        self.offsets = np.concatenate([self._offsets(a) for a in self.arrays])
        self.rows = np.array([a.strides[-2] // a.itemsize for a in self.arrays], dtype=np.int64)
        self.offsets_pointer, self.rows_pointer = self.offsets.ctypes.data, self.rows.ctypes.data

    @staticmethod
    def _rows_contiguous(a):
        item = a.itemsize
        if any(s < 0 or s % item for s in a.strides) or (a.shape[-1] > 1 and a.strides[-1] != item):
            return np.ascontiguousarray(a)
        return a

    @staticmethod
    def _offsets(a):
        offsets = np.zeros(a.shape[:-2], dtype=np.int64)
        for axis, (size, stride) in enumerate(zip(a.shape[:-2], a.strides[:-2])):
            index_shape = [1] * (a.ndim - 2)
            index_shape[axis] = size
            offsets += np.arange(size, dtype=np.int64).reshape(index_shape) * (stride // a.itemsize)
        return offsets.reshape(-1)


# ---- Linear's forward with its bias; the embedding's scatter-add --------------------------------------

def linear_forward(xp, x, w, bias):
    """kernels_numpy.linear_forward, compiled where there is a bias: the output rows filled with it (on the
    intra-op threads), then one BLAS GEMM (on the BLAS's threads) adding x @ w.T onto them."""
    lib = None if bias is None else _compiled(xp, x, w, bias)
    if lib is None or x.ndim != 2 or w.ndim != 2 or bias.shape != w.shape[:1] or x.shape[1] != w.shape[1]:
        return _ref.linear_forward(xp, x, w, bias)
    (n, k), f = x.shape, w.shape[0]
    x, w, bias = _c(x), _c(w), _c(bias)
    out = np.empty((n, f), dtype=x.dtype)
    blocks = _blocks(n, f)
    _kernel(lib, "linear_bias_gemm", x.dtype)(*_pointers(x, w, bias, out), n, k, f, blocks.bounds, blocks.count)
    return out


def index_add_rows(xp, target, index, values):
    """kernels_numpy.index_add_rows, compiled: each row of values added to its target row in turn (np.add.at's
    order), over blocks of columns on the intra-op threads. An index out of range raises IndexError, as
    NumPy's indexing does, before anything is added."""
    lib = _compiled(xp, target, values)
    if (lib is None or target.ndim != 2 or not target.flags.c_contiguous or index.dtype.kind != "i"
            or values.shape != index.shape + target.shape[1:]):
        return _ref.index_add_rows(xp, target, index, values)
    n_target_rows, n_cols = target.shape
    rows = _c(index.reshape(-1), np.int64)
    bad = (rows < -n_target_rows) | (rows >= n_target_rows)
    if bad.any():
        raise IndexError(f"index {rows[bad][0]} is out of bounds for axis 0 with size {n_target_rows}")
    values = _c(values.reshape(rows.size, n_cols))
    args = _pointers(target, rows, values)
    kernel = _kernel(lib, "index_add_rows", target.dtype)

    blocks = _blocks(n_cols, rows.size)
    kernel(*args, rows.size, n_cols, n_target_rows, blocks.bounds, blocks.count)


# ---- multi-tensor passes: gradient norms, scaling, the SGD and Adam updates ---------------------------
# One call for a whole list of arrays (all the gradients of a clipping, all the parameters of an optimizer
# step): the kernel works on ranges of the arrays' concatenated elements, so one call splits every array's
# elements evenly over the intra-op threads instead of one call (and one thread's pass over the small ones)
# per array.

# Elements per partial sum of squares: each array is summed in chunks of this many and each array's chunk
# sums are added in order afterwards, so the norms do not depend on how the chunks fell to the threads
SUM_SQUARES_CHUNK = 1 << 16


def _compiled_list(xp, arrays):
    """_compiled for a list of arrays, where empty arrays are fine (they cover no elements); None for a list
    of none or only empty arrays, or of several dtypes."""
    nonempty = [a for a in arrays if a.size]
    if not nonempty or any(a.dtype != arrays[0].dtype for a in arrays):
        return None
    return _compiled(xp, *nonempty)


def _updatable(arrays):
    """Whether a kernel may write the arrays in place through their addresses: C-contiguous and writeable (the
    reference raises NumPy's error for a read-only one)."""
    return all(a.flags.c_contiguous and a.flags.writeable for a in arrays)


def _shaped_like(params, *lists):
    """Whether every array of the lists (None aside) has the shape of the parameter at its position."""
    return all(a is None or a.shape == p.shape for arrays in lists for p, a in zip(params, arrays))


def _addresses(arrays):
    """The arrays' data addresses as a C array of pointers (null for None). The caller keeps the arrays alive."""
    return np.array([0 if a is None else a.ctypes.data for a in arrays], dtype=np.uintp)


def _offsets(counts):
    """[0, counts[0], counts[0] + counts[1], ...]: where each array starts in the concatenation, and the total."""
    offsets = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    return offsets


def norms(xp, arrays, norm_type):
    """kernels_numpy.norms, compiled for the L2 norm: the squares of all the arrays summed in one pass over
    chunks on the intra-op threads, in float64, so the norms (float64) are at least as accurate as the
    reference's (which sums float32 arrays in float32)."""
    lib = _compiled_list(xp, arrays)
    if lib is None or float(norm_type) != 2.0:
        return _ref.norms(xp, arrays, norm_type)
    arrays = [_c(a) for a in arrays]
    sizes = np.array([a.size for a in arrays], dtype=np.int64)
    chunks = -(-sizes // SUM_SQUARES_CHUNK)
    offsets, chunk_offsets = _offsets(sizes), _offsets(chunks)
    partials = np.empty(int(chunk_offsets[-1]), dtype=np.float64)
    pointers = _addresses(arrays)  # kept alive through the call, as every array whose address is passed
    args = (pointers.ctypes.data, offsets.ctypes.data, chunk_offsets.ctypes.data, len(arrays),
            SUM_SQUARES_CHUNK, partials.ctypes.data)
    kernel = _kernel(lib, "foreach_sum_squares", arrays[0].dtype)
    blocks = _blocks(partials.size, SUM_SQUARES_CHUNK)
    kernel(*args, blocks.bounds, blocks.count)
    owner = np.repeat(np.arange(len(arrays)), chunks)
    return np.sqrt(np.bincount(owner, weights=partials, minlength=len(arrays)))  # each array's chunks in order


def scale_(xp, arrays, coef):
    """kernels_numpy.scale_, compiled: every array multiplied by coef in one pass over their elements."""
    lib = _compiled_list(xp, arrays)
    if lib is None or not _updatable(arrays):
        return _ref.scale_(xp, arrays, coef)
    offsets = _offsets([a.size for a in arrays])
    pointers = _addresses(arrays)
    kernel = _kernel(lib, "foreach_scale", arrays[0].dtype)
    blocks = _blocks(int(offsets[-1]), 1)
    kernel(pointers.ctypes.data, offsets.ctypes.data, len(arrays), float(coef), blocks.bounds, blocks.count)


def foreach_sgd_step(xp, params, grads, momentum_buffers, lr, momentum=0.0, dampening=0.0, weight_decay=0.0,
                     nesterov=False, maximize=False):
    """kernels_numpy.foreach_sgd_step, compiled: every parameter's update in one pass over all their elements,
    bitwise the reference's (the same operations in the same order). The first step's buffers are new
    arrays, as there."""
    _ref.check_list_lengths("foreach_sgd_step", params=params, grads=grads, momentum_buffers=momentum_buffers)
    buffers = [b for b in momentum_buffers if b is not None]
    lib = _compiled_list(xp, [*params, *grads, *buffers])
    if lib is None or not _updatable([*params, *buffers]) or not _shaped_like(params, grads, momentum_buffers):
        return _ref.foreach_sgd_step(xp, params, grads, momentum_buffers, lr, momentum, dampening, weight_decay,
                                     nesterov, maximize)
    grads = [_c(g) for g in grads]
    with_momentum = momentum != 0
    first = np.array([with_momentum and b is None for b in momentum_buffers], dtype=np.int8)
    if with_momentum:
        momentum_buffers = [np.empty(p.shape, p.dtype) if b is None else b for p, b in zip(params, momentum_buffers)]
    offsets = _offsets([p.size for p in params])
    pointers = [_addresses(params), _addresses(grads), _addresses(momentum_buffers) if with_momentum else None]
    args = (*(None if a is None else a.ctypes.data for a in pointers), first.ctypes.data, offsets.ctypes.data,
            len(params), float(lr), float(momentum), float(dampening), float(weight_decay), int(bool(nesterov)),
            int(bool(maximize)))
    kernel = _kernel(lib, "foreach_sgd", params[0].dtype)
    blocks = _blocks(int(offsets[-1]), 1)
    kernel(*args, blocks.bounds, blocks.count)
    return list(momentum_buffers)  # without momentum: as given (sgd_step's result), None where there is none


def foreach_adam_step(xp, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr, beta1, beta2, eps,
                      weight_decay=0.0, decoupled=False, maximize=False):
    """kernels_numpy.foreach_adam_step, compiled: every parameter's update in one pass over all their elements,
    bitwise the reference's (the same operations in the same order), each parameter at its own step."""
    _ref.check_list_lengths("foreach_adam_step", params=params, grads=grads, exp_avgs=exp_avgs,
                            exp_avg_sqs=exp_avg_sqs, max_exp_avg_sqs=max_exp_avg_sqs, steps=steps)
    amsgrad = [m is not None for m in max_exp_avg_sqs]
    state = [*exp_avgs, *exp_avg_sqs, *(m for m in max_exp_avg_sqs if m is not None)]
    lib = _compiled_list(xp, [*params, *grads, *state])
    if (lib is None or len(set(amsgrad)) > 1 or not _updatable([*params, *state])
            or not _shaped_like(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs)):
        return _ref.foreach_adam_step(xp, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr, beta1,
                                      beta2, eps, weight_decay, decoupled, maximize)
    grads = [_c(g) for g in grads]
    scalars = np.array([_ref.adam_scalars(step, lr, beta1, beta2) for step in steps], dtype=np.float64).reshape(-1, 2)
    step_sizes, corrections = np.ascontiguousarray(scalars[:, 0]), np.ascontiguousarray(scalars[:, 1])
    offsets = _offsets([p.size for p in params])
    pointers = [_addresses(a) for a in (params, grads, exp_avgs, exp_avg_sqs)]
    pointers.append(_addresses(max_exp_avg_sqs) if amsgrad and amsgrad[0] else None)
    args = (*(None if a is None else a.ctypes.data for a in pointers), step_sizes.ctypes.data, corrections.ctypes.data,
            offsets.ctypes.data, len(params), float(lr), float(beta1), float(beta2), float(eps), float(weight_decay),
            int(bool(decoupled)), int(bool(maximize)))
    kernel = _kernel(lib, "foreach_adam", params[0].dtype)
    blocks = _blocks(int(offsets[-1]), 1)
    kernel(*args, blocks.bounds, blocks.count)


def _bind_reference_kernels():
    """The table's other entries are kernels_numpy's own (a kernel or constant added there is here too), bound
    as this module's names at import: a module __getattr__ would add a microsecond or two to every call of
    them, which an autograd op on small tensors feels."""
    own = globals()
    for name, value in vars(_ref).items():
        imported = isinstance(value, types.ModuleType) or getattr(value, "__module__", _ref.__name__) != _ref.__name__
        if not name.startswith("_") and name not in own and not imported:
            own[name] = value


_bind_reference_kernels()
