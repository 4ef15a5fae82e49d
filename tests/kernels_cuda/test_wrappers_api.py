"""The CUDA wrappers against their contract, on the CPU.

1. Same public names and signatures as kernels_numpy (CudaBackend.kernels can replace it).
2. Every launch matches its kernel's C signature: the wrappers run with xp = NumPy and a fake
   `kernel` that, instead of launching, checks each argument against the parameter list parsed from
   the .cu source (pointer or scalar, element dtype, exact NumPy scalar type for the C type,
   C-contiguity) and checks the launch shape against launch.py and the kernel's launch bounds.
   A wrong argument order or a Python float where the kernel takes a float would be garbage on
   the GPU; here it fails.
3. Fallbacks (dtypes without a kernel) give the reference's results and launch nothing.
"""
import inspect
import re

import numpy as np
import pytest

from disttrain.kernels_cuda import launch_config as launch, loader, wrappers
from disttrain.tensor import kernels_numpy


def _public_functions(module):
    return {name: f for name, f in vars(module).items()
            if callable(f) and not name.startswith("_") and inspect.isfunction(f)
            and f.__module__ in (module.__name__, kernels_numpy.__name__)}


def test_same_names_and_signatures_as_kernels_numpy():
    ref, cuda = _public_functions(kernels_numpy), _public_functions(wrappers)
    for helper in kernels_numpy.HELPERS:
        ref.pop(helper)
    assert set(ref) == set(cuda), f"kernels_numpy only: {set(ref) - set(cuda)}; wrappers only: {set(cuda) - set(ref)}"
    for name in ref:
        assert inspect.signature(cuda[name]) == inspect.signature(ref[name]), name
    assert wrappers.ACTIVATIONS == kernels_numpy.ACTIVATIONS


def test_activation_codes_match_the_preamble():
    text = (loader.SOURCE_DIR / loader.PREAMBLE).read_text()
    codes = {name.lower(): int(v) for name, v in re.findall(r"#define DT_ACT_(\w+) (\d+)", text)}
    assert codes == {name: i for i, name in enumerate(wrappers.ACTIVATIONS)}
    norms = dict(re.findall(r"#define DT_NORM_(\w+) (\d+)", (loader.SOURCE_DIR / "norms.cu").read_text()))
    assert {k: int(v) for k, v in norms.items()} == {
        "SUM_SQ": wrappers.NORM_SUM_SQ, "MAX_ABS": wrappers.NORM_MAX_ABS, "SUM_POW": wrappers.NORM_SUM_POW}


def test_cuda_backend_uses_the_wrappers():
    cupy = pytest.importorskip("cupy", reason="CuPy (the cuda extra) is not installed")
    from disttrain.tensor.backend import CudaBackend

    backend = CudaBackend(cupy)  # constructing it needs no GPU
    assert backend.kernels is wrappers and backend.sync_checks


# ---- argument checking against the C signatures ---------------------------------------------------------

def _c_signatures():
    """{(source, kernel name without suffix or None-typed name): [(base type, is_pointer), ...]}"""
    sigs = {}
    for source in loader.sources():
        text = (loader.SOURCE_DIR / f"{source}.cu").read_text().replace("\\\n", " ")
        for name, params in re.findall(r"(\w+)_##S\s*\(([^)]*)\)\s*\{", text):
            sigs[(source, name)] = _params(params)
        for name, params in re.findall(r'extern "C" __global__ void\s+DT_BOUNDS\w*\s+(\w+)\s*\(([^)]*)\)', text):
            sigs[(source, name)] = _params(params)
    return sigs


def _params(text):
    out = []
    for param in text.split(","):
        words = param.replace("*", " * ").replace("__restrict__", "").split()
        base = [w for w in words[:-1] if w not in ("const", "*")][0]
        out.append((base, "*" in words))
    return out


SIGNATURES = _c_signatures()
C_SCALARS = {"dt_index": np.int64, "int": np.int32, "double": np.float64, "dt_u64": np.uint64}
C_POINTEES = {"dt_index": np.dtype(np.int64), "double": np.dtype(np.float64)}


def test_the_signature_parser_sees_every_registered_kernel():
    registered = {(s, n) for s, names in loader.KERNELS.items() for n in names}
    registered |= {(s, n) for s, names in loader.UNTYPED_KERNELS.items() for n in names}
    assert set(SIGNATURES) == registered


class _Recorder:
    def __init__(self):
        self.launches = []

    def kernel(self, source, name, dtype=None):
        if dtype is None:
            assert name in loader.UNTYPED_KERNELS.get(source, ()), (source, name)
        else:
            assert name in loader.KERNELS[source], (source, name)
            assert np.dtype(dtype) in loader.SUFFIX, dtype
        params = SIGNATURES[(source, name)]
        elem = np.dtype(dtype) if dtype is not None else None

        def launch_fn(grid, block, args, shared_mem=0):
            assert len(args) == len(params), f"{name}: {len(args)} arguments for {len(params)} parameters"
            for k, ((base, is_pointer), arg) in enumerate(zip(params, args)):
                where = f"{name} argument {k} ({base}{'*' if is_pointer else ''})"
                if is_pointer:
                    assert isinstance(arg, np.ndarray), f"{where}: got {type(arg).__name__}"
                    assert arg.flags.c_contiguous, f"{where}: not C-contiguous"
                    assert arg.dtype == (elem if base == "T" else C_POINTEES[base]), f"{where}: dtype {arg.dtype}"
                else:
                    expected = elem.type if base == "T" else C_SCALARS[base]
                    assert type(arg) is expected, f"{where}: {type(arg).__name__}, expected {expected.__name__}"
            bound = launch.MAX_BLOCK if name.startswith(("xent_forward", "softmax_")) else launch.BLOCK
            assert len(block) == 1 and block[0] % 32 == 0 and 0 < block[0] <= bound, (name, block)
            assert all(isinstance(g, int) and g >= 1 for g in grid) and len(grid) <= 2, (name, grid)
            if len(grid) == 2:
                assert grid[1] <= launch.MAX_GRID_Y
            if name in ("xent_forward_block", "softmax_forward_block", "softmax_backward_block"):
                assert shared_mem == 2 * (block[0] // 32) * elem.itemsize
            else:
                assert shared_mem == 0, name
            self.launches.append(name)

        return launch_fn


@pytest.fixture
def launches(monkeypatch):
    recorder = _Recorder()
    monkeypatch.setattr(wrappers, "kernel", recorder.kernel)
    return recorder.launches


def _r(shape, dtype, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


DTYPES = [np.float32, np.float64]


@pytest.mark.parametrize("dtype", DTYPES)
def test_elementwise_launches(dtype, launches):
    x = _r((5, 7), dtype)
    wrappers.sigmoid(np, x)
    wrappers.sigmoid(np, _r((3, 4, 5), dtype)[:, ::2])  # strided input: made contiguous first
    for act in wrappers.ACTIVATIONS:
        wrappers.bias_act_forward(np, x, _r(7, dtype), act)
        wrappers.bias_act_forward(np, x, None, act)
        gx, gb = wrappers.bias_act_backward(np, x, x, act, with_bias=True)
        assert gx.shape == x.shape and gb.shape == (7,)
    assert launches == ["bias_act_forward"] * 2 + ["bias_act_forward", "bias_act_forward", "bias_act_backward"] * 4


@pytest.mark.parametrize("dtype", DTYPES)
def test_lstm_launches(dtype, launches):
    b, h = 3, 5
    outs = wrappers.lstm_cell_forward(np, _r((b, 4 * h), dtype), _r((b, h), dtype), _r((b, h), dtype),
                                      _r((4 * h, h), dtype))
    assert [o.shape for o in outs] == [(b, h), (b, h), (b, 4 * h), (b, h)]
    grads = wrappers.lstm_cell_backward(np, _r((b, h), dtype), _r((b, h), dtype).T.copy().T, _r((b, 4 * h), dtype),
                                        _r((b, h), dtype), _r((b, h), dtype), _r((b, h), dtype),
                                        _r((4 * h, h), dtype))
    assert [g.shape for g in grads] == [(b, 4 * h), (b, h), (b, h), (4 * h, h)]
    assert launches == ["lstm_cell_forward", "lstm_cell_backward"]


@pytest.mark.parametrize("dtype", DTYPES)
def test_lstm_layer_launches_one_cell_kernel_per_step(dtype, launches):
    t, b, h = 4, 3, 5
    out, cs, acts, tanh_c = wrappers.lstm_layer_forward(np, _r((t, b, 4 * h), dtype), _r((b, h), dtype),
                                                         _r((b, h), dtype), _r((4 * h, h), dtype))
    assert [a.shape for a in (out, cs, acts, tanh_c)] == [(t, b, h), (t, b, h), (t, b, 4 * h), (t, b, h)]
    grads = wrappers.lstm_layer_backward(np, _r((t, b, h), dtype), _r((b, h), dtype), _r((b, h), dtype).T.copy().T,
                                         acts, tanh_c, out, cs, _r((b, h), dtype), _r((b, h), dtype),
                                         _r((4 * h, h), dtype))
    assert [g.shape for g in grads] == [(t, b, 4 * h), (b, h), (b, h), (4 * h, h)]
    assert launches == ["lstm_cell_forward"] * t + ["lstm_cell_backward"] * t


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_cols, kind", [(10, "warp"), (5000, "block")])
def test_cross_entropy_launches(dtype, n_cols, kind, launches):
    logits = _r((6, n_cols), dtype)
    target = np.array([0, 1, -100, 3, 4, 5], dtype=np.int32)  # int32 targets are widened
    losses, lse = wrappers.cross_entropy_forward(np, logits, target, -100, keep_softmax=True)
    assert losses.shape == lse.shape == (6,) and losses.dtype == lse.dtype == dtype
    wrappers.cross_entropy_backward(np, logits, target, lse, np.full(6, 0.5, dtype))
    wrappers.cross_entropy_backward(np, logits, target, None, np.asarray(0.5, dtype))  # recomputes lse
    assert launches == [f"xent_forward_{kind}", "xent_backward", f"xent_forward_{kind}", "xent_backward"]


@pytest.mark.parametrize("dtype", DTYPES)
def test_embedding_launches(dtype, launches):
    target = np.zeros((10, 4), dtype)
    wrappers.index_add_rows(np, target, np.array([[1, 2], [2, 9]]), _r((2, 2, 4), dtype))
    assert launches == ["index_add_rows"]


@pytest.mark.parametrize("dtype", DTYPES)
def test_optimizer_launches(dtype, launches):
    p, g = _r(100, dtype), _r(100, dtype, 1)
    buf = wrappers.sgd_step(np, p, g, None, 0.1, momentum=0.9, nesterov=True)  # first step: creates the buffer
    assert buf.shape == p.shape and buf.dtype == p.dtype
    assert wrappers.sgd_step(np, p, g, buf, 0.1, momentum=0.9, dampening=0.1) is buf
    assert wrappers.sgd_step(np, p, g, None, 0.1) is None  # no momentum: no buffer
    m, v, vmax = np.zeros_like(p), np.zeros_like(p), np.zeros_like(p)
    wrappers.adam_step(np, p, g, m, v, None, 1, 1e-3, 0.9, 0.999, 1e-8)
    wrappers.adam_step(np, p, g, m, v, vmax, 2, 1e-3, 0.9, 0.999, 1e-8, weight_decay=0.1, decoupled=True,
                       maximize=True)
    assert launches == ["sgd_step"] * 3 + ["adam_step"] * 2


@pytest.mark.parametrize("dtype", DTYPES)
def test_foreach_updates_launch_one_fused_update_per_parameter(dtype, launches):
    params, grads = [_r(100, dtype), _r((3, 4), dtype)], [_r(100, dtype, 1), _r((3, 4), dtype, 2)]
    buffers = wrappers.foreach_sgd_step(np, params, grads, [None, None], 0.1, momentum=0.9)
    assert [b.shape for b in buffers] == [(100,), (3, 4)]
    again = wrappers.foreach_sgd_step(np, params, grads, buffers, 0.1, momentum=0.9)
    assert all(b is a for a, b in zip(buffers, again))  # later steps update the buffers in place
    moments = [[np.zeros_like(p) for p in params] for _ in range(2)]
    wrappers.foreach_adam_step(np, params, grads, *moments, [None, None], [1, 3], 1e-3, 0.9, 0.999, 1e-8)
    assert launches == ["sgd_step"] * 4 + ["adam_step"] * 2


@pytest.mark.parametrize("dtype", DTYPES)
def test_norm_and_bucket_launches(dtype, launches):
    arrays = [_r((3, 4), dtype), _r(7, dtype, 1)]
    for p in (2.0, float("inf"), 3.0):
        assert wrappers.norms(np, arrays, p).shape == (2,)
    wrappers.scale_(np, arrays, 0.5)
    assert wrappers.clip_by_total_norm_(np, arrays, 1.0).shape == ()
    flat = wrappers.bucket_pack(np, arrays)
    assert flat.shape == (19,)
    wrappers.bucket_unpack(np, flat, arrays, scale=0.25)
    per_norm = ["norm_accumulate", "norm_accumulate", "norm_finalize"]
    assert launches == (per_norm * 3 + ["scale"] * 2 + per_norm + ["clip_scale"] * 2
                        + ["copy_scaled"] * 2 + ["copy_scaled"] * 2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_random_launches(dtype, launches):
    out = wrappers.counter_uniform(np, (3, 5), dtype, 2 ** 64 + 7, 2 ** 64 - 1)  # both wrap to uint64
    assert out.shape == (3, 5) and out.dtype == dtype
    assert wrappers.counter_uniform(np, (0, 4), dtype, 1, 0).shape == (0, 4)  # empty: no launch
    assert launches == ["counter_uniform"]


@pytest.mark.parametrize("dtype", DTYPES)
def test_gelu_launches(dtype, launches):
    x = _r((3, 4, 5), dtype)
    assert wrappers.gelu_forward(np, x[:, ::2]).shape == (3, 2, 5)  # strided input: made contiguous first
    assert wrappers.gelu_backward(np, x, x).shape == x.shape
    assert launches == ["gelu_forward", "gelu_backward"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_cols, kind", [(10, "warp"), (5000, "block")])
def test_softmax_launches(dtype, n_cols, kind, launches):
    x = _r((2, 3, n_cols), dtype)
    for causal in (False, True):
        y = wrappers.softmax_forward(np, x, causal)
        assert y.shape == x.shape and y.dtype == dtype
    assert wrappers.softmax_backward(np, x, y).shape == x.shape
    assert launches == [f"softmax_forward_{kind}"] * 2 + [f"softmax_backward_{kind}"]


@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_norm_launches(dtype, launches):
    x, w = _r((6, 10), dtype), _r(10, dtype, 1)
    y, mean, rstd = wrappers.layer_norm_forward(np, x, w, w, 1e-5)
    assert y.shape == x.shape and mean.shape == rstd.shape == (6,)
    wrappers.layer_norm_forward(np, x, None, None, 1e-5)
    grads = wrappers.layer_norm_backward(np, x, x, w, mean, rstd, with_bias=True)
    assert [g.shape for g in grads] == [(6, 10), (10,), (10,)]
    assert wrappers.layer_norm_backward(np, x, x, None, mean, rstd)[1:] == (None, None)  # no column sums
    assert launches == ["layer_norm_forward"] * 2 + ["layer_norm_backward", "layer_norm_param_grads",
                                                     "layer_norm_backward"]


def test_fallbacks_launch_nothing_and_match_the_reference(launches):
    x = _r((4, 6), np.float16)
    np.testing.assert_array_equal(wrappers.sigmoid(np, x), kernels_numpy.sigmoid(np, x))
    logits, target = _r((4, 6), np.float16), np.array([1, 2, 3, -100])
    got = wrappers.cross_entropy_forward(np, logits, target, -100)[0]
    np.testing.assert_array_equal(got, kernels_numpy.cross_entropy_forward(np, logits, target, -100)[0])
    got = wrappers.norms(np, [_r(5, np.float32)], 0.0)  # order 0 (count of non-zeros): the reference
    assert got.tolist() == [5.0]
    np.testing.assert_array_equal(wrappers.counter_uniform(np, (), np.float64, 3, 9),
                                  kernels_numpy.counter_uniform(np, (), np.float64, 3, 9))  # 0-d
    with pytest.raises(TypeError, match="float32 or float64"):
        wrappers.counter_uniform(np, (2,), np.float16, 3, 9)
    p = _r((4, 6), np.float32)[:, ::2]  # a non-contiguous parameter cannot be updated by the kernel in place
    expected = p.copy()
    kernels_numpy.sgd_step(np, expected, np.ones_like(p), None, 0.5)
    wrappers.sgd_step(np, p, np.ones_like(p), None, 0.5)
    np.testing.assert_array_equal(p, expected)
    assert launches == []
