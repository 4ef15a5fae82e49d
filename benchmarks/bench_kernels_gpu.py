"""Fused CUDA kernels: achieved memory bandwidth as a fraction of the GPU's peak, and speed-up over the
same computation composed of CuPy array ops (the NumPy reference kernel run with xp = cupy).

Needs a CUDA GPU and CuPy (pip install -e '.[cuda]'). Times with CUDA events, median of --rounds.
Target (issue 6): >= 0.7 of peak bandwidth on large tensors.

    python benchmarks/bench_kernels_gpu.py [--size-mb 256] [--rounds 20] [--peak-gbs 3350] [--out results.json]

Bytes counted per kernel are the compulsory DRAM traffic (each input read once, each output written
once); the peak is 2 x memory clock x bus width from the device properties unless --peak-gbs is given.
"""
import argparse
import json
import statistics
import sys

import numpy as np

import disttrain as dt


def _gpu_or_exit():
    if not dt.cuda_available():
        sys.exit("bench_kernels_gpu: needs a CUDA GPU and CuPy (pip install -e '.[cuda]'); nothing measured")
    import cupy

    return cupy


def peak_bandwidth_gbs(cp):
    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    clock_khz, bus_bits = props.get("memoryClockRate", 0), props.get("memoryBusWidth", 0)
    return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9 if clock_khz and bus_bits else None


def device_name(cp):
    name = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)["name"]
    return name.decode() if isinstance(name, bytes) else name


def time_ms(cp, fn, rounds, warmup=3):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rounds):
        start, stop = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, stop))
    return statistics.median(times)


def cases(cp, n):
    """(name, bytes moved, fused fn, reference fn) for every kernel, on about n float32 elements each."""
    from disttrain.kernels_cuda import launch_config as launch, loader, wrappers as W
    from disttrain.tensor import kernels_numpy as K

    f32 = np.float32
    rng = cp.random.default_rng(0)
    rand = lambda *shape: rng.standard_normal(shape, dtype=f32)  # noqa: E731
    out = []

    x = rand(n)
    out.append(("sigmoid", 2 * 4 * n, lambda: W.sigmoid(cp, x), lambda: K.sigmoid(cp, x)))
    cols = 4096
    xb, b = rand(n // cols, cols), rand(cols)
    out.append(("bias+tanh forward", 2 * 4 * n, lambda: W.bias_act_forward(cp, xb, b, "tanh"),
                lambda: K.bias_act_forward(cp, xb, b, "tanh")))
    yb = cp.tanh(xb)
    out.append(("bias+tanh backward", 3 * 4 * n, lambda: W.bias_act_backward(cp, xb, yb, "tanh"),
                lambda: K.bias_act_backward(cp, xb, yb, "tanh")))

    hidden = 1024
    batch = max(1, n // (16 * hidden))
    gates_x, hh, c = rand(batch, 4 * hidden), rand(batch, 4 * hidden), rand(batch, hidden)
    bufs = [cp.empty((batch, hidden), f32) for _ in range(3)] + [cp.empty((batch, 4 * hidden), f32)]
    grid, block = launch.rows_config(batch, hidden)
    lstm_fwd = loader.kernel("lstm", "lstm_cell_forward", f32)
    out.append(("lstm cell forward (kernel only)", 4 * 16 * batch * hidden,
                lambda: lstm_fwd(grid, block, (gates_x, hh, c, bufs[0], bufs[1], bufs[3], bufs[2],
                                               np.int64(batch), np.int64(hidden))), None))
    acts, tanh_c, dh, dc = rand(batch, 4 * hidden), rand(batch, hidden), rand(batch, hidden), rand(batch, hidden)
    d_pre, dc_prev = cp.empty((batch, 4 * hidden), f32), cp.empty((batch, hidden), f32)
    lstm_bwd = loader.kernel("lstm", "lstm_cell_backward", f32)
    out.append(("lstm cell backward (kernel only)", 4 * 14 * batch * hidden,
                lambda: lstm_bwd(grid, block, (dh, dc, acts, tanh_c, c, d_pre, dc_prev, np.int64(batch),
                                               np.int64(hidden))), None))

    for vocab in (10_000, 512):
        rows = max(1, n // vocab)
        logits = rand(rows, vocab)
        target = cp.asarray(np.random.default_rng(0).integers(0, vocab, rows))
        _, lse = W.cross_entropy_forward(cp, logits, target, -100)
        scale = cp.full(rows, 1.0 / rows, f32)
        out.append((f"cross-entropy forward C={vocab}", 4 * rows * vocab,
                    lambda lg=logits, t=target: W.cross_entropy_forward(cp, lg, t, -100),
                    lambda lg=logits, t=target: K.cross_entropy_forward(cp, lg, t, -100, keep_softmax=True)))
        out.append((f"cross-entropy backward C={vocab}", 2 * 4 * rows * vocab,
                    lambda lg=logits, t=target, s=lse, sc=scale: W.cross_entropy_backward(cp, lg, t, s, sc),
                    lambda lg=logits, t=target, s=lse, sc=scale: K.cross_entropy_backward(cp, lg, t, s, sc)))

    dim = 256
    tokens = max(1, n // dim)
    values = rand(tokens, dim)
    idx = cp.asarray(np.random.default_rng(0).integers(0, 10_000, tokens))
    table = cp.zeros((10_000, dim), f32)
    out.append(("embedding backward (scatter-add)", 4 * 3 * tokens * dim,
                lambda: W.index_add_rows(cp, table, idx, values),
                lambda: K.index_add_rows(cp, table, idx, values)))

    p, g, m, v = rand(n), rand(n), rand(n), cp.abs(rand(n))
    out.append(("sgd momentum step", 4 * 5 * n, lambda: W.sgd_step(cp, p, g, m, 0.1, 0.9),
                lambda: K.sgd_step(cp, p, g, m, 0.1, 0.9)))
    out.append(("adam step", 4 * 7 * n, lambda: W.adam_step(cp, p, g, m, v, None, 10, 1e-3, 0.9, 0.999, 1e-8),
                lambda: K.adam_step(cp, p, g, m, v, None, 10, 1e-3, 0.9, 0.999, 1e-8)))
    out.append(("grad norm (L2)", 4 * n, lambda: W.norms(cp, [g], 2.0), lambda: K.norms(cp, [g], 2.0)))
    out.append(("clip by total norm (device)", 4 * 3 * n, lambda: W.clip_by_total_norm_(cp, [g], 1e9),
                lambda: K.clip_by_total_norm_(cp, [g], 1e9)))
    parts = [rand(n // 8) for _ in range(8)]
    flat = cp.empty(sum(a.size for a in parts), f32)
    out.append(("bucket pack (8 tensors)", 2 * 4 * flat.size, lambda: W.bucket_pack(cp, parts, flat),
                lambda: K.bucket_pack(cp, parts, flat)))
    out.append(("bucket unpack x 1/N", 2 * 4 * flat.size, lambda: W.bucket_unpack(cp, flat, parts, 0.25),
                lambda: K.bucket_unpack(cp, flat, parts, 0.25)))
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, default=256, help="float32 megabytes per operand")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--peak-gbs", type=float, default=None, help="peak DRAM bandwidth, GB/s (default: derived)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    cp = _gpu_or_exit()
    from disttrain.kernels_cuda import loader

    loader.compile_all()
    n = int(args.size_mb * 2 ** 20 / 4)
    peak = args.peak_gbs or peak_bandwidth_gbs(cp)
    print(f"{device_name(cp)}; peak {peak:.0f} GB/s" if peak else f"{device_name(cp)}; peak unknown (pass --peak-gbs)")
    print(f"{'kernel':36s} {'ms':>8s} {'GB/s':>8s} {'of peak':>8s} {'CuPy ops ms':>12s} {'speed-up':>9s}")
    rows = []
    for name, nbytes, fused, reference in cases(cp, n):
        ms = time_ms(cp, fused, args.rounds)
        gbs = nbytes / ms / 1e6
        ref_ms = time_ms(cp, reference, args.rounds) if reference is not None else None
        frac = gbs / peak if peak else None
        rows.append({"kernel": name, "ms": ms, "gb_per_s": gbs, "fraction_of_peak": frac, "reference_ms": ref_ms})
        print(f"{name:36s} {ms:8.3f} {gbs:8.0f} {frac if frac is not None else float('nan'):8.2f} "
              f"{ref_ms if ref_ms is not None else float('nan'):12.3f} "
              f"{(ref_ms / ms) if ref_ms else float('nan'):8.1f}x")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": device_name(cp), "peak_gb_per_s": peak, "size_mb": args.size_mb,
                       "command": " ".join(sys.argv), "results": rows}, f, indent=1)


if __name__ == "__main__":
    main()
