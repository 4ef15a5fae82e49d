"""Activation checkpointing: peak activation memory vs depth and window, and what it costs in time.

MLP: N blocks of Linear(W, W) + ReLU, batch B, float32, loss mean(out**2), N = 16 ... 512,
checkpoint_sequential with "sqrt" (round(sqrt(N)) segments) against the plain chain.
LSTM: one layer, hidden H, batch B, loss on the final hidden state, T = 64 ... 2048, recurrent
checkpointing (checkpoint_segments="sqrt") against none.

Memory is the MemoryMeter peak above the start of one training step (forward + backward), after a
warm-up step and zero_grad(set_to_none=False) so the parameter gradients already exist: i.e. the
activation memory. For the LSTM it also shows what forward leaves for backward (the (T, B, H)
output sequence, made during forward, is dropped by the caller here). The log-log slope of peak
against N (or T) is fitted over the whole range. Step time (forward + backward) of sqrt vs none
is measured side by side (benchmarks/harness.py: interleaved rounds, median) with no meter running,
and so is the cost of a running meter. Saves benchmarks/checkpointing_memory.png.

BLAS runs on one thread unless OPENBLAS_NUM_THREADS is set: on a shared 2-core machine a second
BLAS thread that is descheduled stalls every GEMM, which makes the many small GEMMs of the
checkpointed runs erratic to time.

    python benchmarks/bench_checkpointing.py [--rounds 7]
"""
import argparse
import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before NumPy loads BLAS; see the docstring

import numpy as np  # noqa: E402

import disttrain as dt  # noqa: E402
from disttrain import nn  # noqa: E402
from disttrain.checkpointing import MemoryMeter, checkpoint_sequential  # noqa: E402
from harness import interleaved, machine  # noqa: E402

MLP_BATCH, MLP_WIDTH = 256, 32
LSTM_BATCH, LSTM_HIDDEN = 8, 32
DEPTHS = [16, 32, 64, 128, 256, 512]
WINDOWS = [64, 128, 256, 512, 1024, 2048]


# ---- the two workloads -----------------------------------------------------------------------
def make_mlp(depth, width=MLP_WIDTH, batch=MLP_BATCH):
    dt.manual_seed(0)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(width, width), nn.ReLU()) for _ in range(depth)])
    x = dt.randn(batch, width)

    def step(segments):
        out = model(x) if segments is None else checkpoint_sequential(model, segments, x)
        loss = (out * out).mean()
        del out
        loss.backward()
        model.zero_grad(set_to_none=False)

    return step


def make_lstm(steps, hidden=LSTM_HIDDEN, batch=LSTM_BATCH):
    dt.manual_seed(0)
    lstm = nn.LSTM(hidden, hidden)
    x = dt.randn(steps, batch, hidden)

    def step(segments, meter=None):
        lstm.checkpoint_segments = segments
        h_n = lstm(x)[1][0]  # the output sequence is dropped: the loss is on the final state
        kept = meter.live_bytes - meter.start_bytes if meter is not None else 0
        h_n.sum().backward()
        del h_n
        lstm.zero_grad(set_to_none=False)
        return kept

    return step


# ---- measurements ------------------------------------------------------------------------------
def mlp_peak(depth, segments):
    step = make_mlp(depth)
    step(segments)  # warm-up: the gradients now exist
    with MemoryMeter() as m:
        step(segments)
    return m.peak_bytes - m.start_bytes


def lstm_peaks(steps, segments):
    step = make_lstm(steps)
    step(segments)
    with MemoryMeter() as m:
        kept = step(segments, m)
    return m.peak_bytes - m.start_bytes, kept


def slope(xs, ys):
    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


def step_times(rounds):
    """Median seconds per step, sqrt vs none side by side (and with a meter running)."""
    mlp, lstm = make_mlp(64, width=256), make_lstm(512, hidden=64, batch=16)

    def timed(fn, *args):
        def run():
            fn(*args)
            return 1
        return run

    def metered(fn, *args):
        def run():
            with MemoryMeter():
                fn(*args)
            return 1
        return run

    rates = interleaved({"mlp none": timed(mlp, None), "mlp sqrt": timed(mlp, "sqrt"),
                         "mlp none, meter on": metered(mlp, None), "meter alone": metered(lambda: None),
                         "lstm none": timed(lstm, None), "lstm sqrt": timed(lstm, "sqrt")}, rounds=rounds)
    return {name: 1 / r for name, r in rates.items()}


def plot(mlp_rows, lstm_rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    mib = 1 / 2 ** 20
    n = [r[0] for r in mlp_rows]
    a.loglog(n, [r[1] * mib for r in mlp_rows], "o-", label="none")
    a.loglog(n, [r[2] * mib for r in mlp_rows], "s-", label='"sqrt"')
    a.set(xlabel="depth N (Linear+ReLU blocks)", ylabel="peak activation memory (MiB)",
          title=f"MLP, width {MLP_WIDTH}, batch {MLP_BATCH}")
    t = [r[0] for r in lstm_rows]
    b.loglog(t, [r[1] * mib for r in lstm_rows], "o-", label="none: peak")
    b.loglog(t, [r[2] * mib for r in lstm_rows], "s-", label='"sqrt": peak')
    b.loglog(t, [r[3] * mib for r in lstm_rows], "o--", label="none: kept after forward")
    b.loglog(t, [r[4] * mib for r in lstm_rows], "s--", label='"sqrt": kept after forward')
    b.set(xlabel="window T (time steps)", ylabel="MiB",
          title=f"LSTM, 1 layer, hidden {LSTM_HIDDEN}, batch {LSTM_BATCH}")
    for ax, ticks in ((a, n), (b, t)):
        ax.set_xticks(ticks, [str(v) for v in ticks])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7, help="timing rounds (median reported)")
    args = parser.parse_args()
    print(f"activation checkpointing; {machine()}")

    print(f"\nMLP: N x (Linear({MLP_WIDTH}, {MLP_WIDTH}) + ReLU), batch {MLP_BATCH}, float32; "
          "peak activation memory per training step")
    print(f"{'N':>6} {'none MiB':>10} {'sqrt MiB':>10} {'sqrt/none':>10}")
    mlp_rows = []
    for depth in DEPTHS:
        none, sqrt = mlp_peak(depth, None), mlp_peak(depth, "sqrt")
        mlp_rows.append((depth, none, sqrt))
        print(f"{depth:>6} {none / 2 ** 20:>10.3f} {sqrt / 2 ** 20:>10.3f} {sqrt / none:>10.3f}")
    s_none, s_sqrt = slope(DEPTHS, [r[1] for r in mlp_rows]), slope(DEPTHS, [r[2] for r in mlp_rows])
    last = mlp_rows[-1]
    print(f"log-log slope vs N: none {s_none:.2f} (target ~1.0), sqrt {s_sqrt:.2f} (target <= 0.6); "
          f"N={last[0]}: sqrt/none = {last[2] / last[1]:.3f} (target <= 0.10)")

    print(f"\nLSTM: 1 layer, hidden {LSTM_HIDDEN}, batch {LSTM_BATCH}, float32, loss on h_T; "
          "peak per training step and memory kept after forward")
    print(f"{'T':>6} {'none peak':>10} {'sqrt peak':>10} {'ratio':>7} {'none kept':>10} {'sqrt kept':>10} {'ratio':>7}"
          "   (MiB)")
    lstm_rows = []
    for steps in WINDOWS:
        (none, none_kept), (sqrt, sqrt_kept) = lstm_peaks(steps, None), lstm_peaks(steps, "sqrt")
        lstm_rows.append((steps, none, sqrt, none_kept, sqrt_kept))
        print(f"{steps:>6} {none / 2 ** 20:>10.3f} {sqrt / 2 ** 20:>10.3f} {sqrt / none:>7.3f} "
              f"{none_kept / 2 ** 20:>10.3f} {sqrt_kept / 2 ** 20:>10.3f} {sqrt_kept / none_kept:>7.3f}")
    cols = list(zip(*lstm_rows))
    print(f"log-log slope vs T: peak none {slope(WINDOWS, cols[1]):.2f}, sqrt {slope(WINDOWS, cols[2]):.2f}; "
          f"kept after forward none {slope(WINDOWS, cols[3]):.2f}, sqrt {slope(WINDOWS, cols[4]):.2f}")
    print("  (the sqrt peak is set during forward by the (T, B, H) output sequence nn.LSTM returns, built "
          "from the segment outputs by one concat: O(T) with 2H floats per step, against ~12H without)")

    times = step_times(args.rounds)
    print(f"\nstep time (forward + backward), median of {args.rounds} interleaved rounds, no meter running:")
    print(f"  MLP N=64, width 256, batch {MLP_BATCH}: none {times['mlp none'] * 1e3:.1f} ms, "
          f"sqrt {times['mlp sqrt'] * 1e3:.1f} ms, ratio {times['mlp sqrt'] / times['mlp none']:.2f}x "
          "(target <= 1.4x; theory ~1.33x)")
    print(f"  LSTM T=512, hidden 64, batch 16: none {times['lstm none'] * 1e3:.1f} ms, "
          f"sqrt {times['lstm sqrt'] * 1e3:.1f} ms, ratio {times['lstm sqrt'] / times['lstm none']:.2f}x")
    print(f"  a MemoryMeter started and stopped around the MLP step (none) costs "
          f"{100 * (times['mlp none, meter on'] / times['mlp none'] - 1):+.1f}%, of which "
          f"{times['meter alone'] * 1e3:.2f} ms is start + stop alone")

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpointing_memory.png")
    plot(mlp_rows, lstm_rows, path)
    print(f"\nplot: {os.path.relpath(path)}")


if __name__ == "__main__":
    main()
