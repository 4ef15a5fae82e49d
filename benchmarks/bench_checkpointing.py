"""Activation checkpointing: peak activation memory vs depth and window, and what it costs in time.

MLP: N blocks of Linear(W, W) + ReLU, batch B, float32, loss mean(out**2), N = 16 ... 512,
checkpoint_sequential with "sqrt" (round(sqrt(N)) segments) against the plain chain.
LSTM language model: the training step of LSTMLanguageModel (embedding -> 1-layer LSTM -> decoder,
vocabulary 96 as the char-level default corpus), loss = forward_loss (mean cross-entropy over the
T*B tokens), T = 64 ... 2048, three settings: none; "sqrt" = the model's sequence checkpointing
(round(sqrt(T)) time segments of embedding -> LSTM -> decoder -> loss, all but the last checkpointed,
only the carried (h, c) kept between them); and, for comparison, only the LSTM's own recurrent
checkpointing (nn.LSTM.checkpoint_segments = "sqrt", the layer output and logits kept whole).

Memory is the MemoryMeter peak above the start of one training step (forward + backward), after a
warm-up step and zero_grad(set_to_none=False) so the parameter gradients already exist: i.e. the
activation memory. For the LM it also shows what forward keeps for backward (live after forward_loss).
The log-log slope of peak against N (or T) is fitted over the whole range. Step time (forward +
backward) of sqrt vs none is measured side by side (benchmarks/harness.py: interleaved rounds,
median) with no meter running, and so is the cost of a running meter; for the LM also the forward
alone of both, which splits the sqrt step's extra time into the recomputed forward and the rest.
Times are this process's CPU seconds (time.process_time): BLAS is single-threaded, so that is the
step's cost, without the waits for cores that other processes on a shared machine add to wall time.
Saves benchmarks/out/checkpointing_memory.png (benchmarks/out/ is not tracked; the plot of record is in
benchmarks/results/).

BLAS runs on one thread unless OPENBLAS_NUM_THREADS is set: on a shared 2-core machine a second
BLAS thread that is descheduled stalls every GEMM, which makes the many small GEMMs of the
checkpointed runs erratic to time.

    python benchmarks/bench_checkpointing.py [--rounds 7]
"""
import argparse
import os
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before NumPy loads BLAS; see the docstring

import numpy as np  # noqa: E402

import disttrain as dt  # noqa: E402
from disttrain import nn  # noqa: E402
from disttrain.checkpointing import MemoryMeter, checkpoint_sequential, segment_bounds  # noqa: E402
from disttrain.models import LSTMLanguageModel  # noqa: E402
from harness import interleaved, machine  # noqa: E402

MLP_BATCH, MLP_WIDTH = 256, 32
LM = dict(vocab=96, hidden=64, embed=32, batch=8)            # the memory sweep
LM_TIMED = {"charlm-sized": dict(steps=256, vocab=96, hidden=256, embed=64, batch=32),   # jobs/charlm.toml's model
            "small": dict(steps=512, vocab=96, hidden=64, embed=32, batch=16)}
LM_MODES = {"none": (None, None), "sqrt": ("sqrt", None), "lstm only": (None, "sqrt")}  # (model, model.lstm)
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


def make_lm(steps, vocab, hidden, embed, batch):
    """step(mode, meter=None, backward=True) runs one LM training step; returns the bytes live after forward."""
    dt.manual_seed(0)
    model = LSTMLanguageModel(vocab, hidden, layers=1, embed=embed)
    rng = np.random.default_rng(0)
    tokens, targets = (dt.tensor(rng.integers(0, vocab, (steps, batch))) for _ in range(2))

    def step(mode, meter=None, backward=True):
        model.checkpoint_segments, model.lstm.checkpoint_segments = LM_MODES[mode]
        loss, _ = model.forward_loss(tokens, targets)
        kept = meter.live_bytes - meter.start_bytes if meter is not None else 0
        if backward:
            loss.backward()
            model.zero_grad(set_to_none=False)
        return kept

    return step


# ---- measurements ------------------------------------------------------------------------------
def mlp_peak(depth, segments):
    step = make_mlp(depth)
    step(segments)  # warm-up: the gradients now exist
    with MemoryMeter() as m:
        step(segments)
    return m.peak_bytes - m.start_bytes


def lm_peaks(steps, mode):
    step = make_lm(steps, **LM)
    step(mode)
    with MemoryMeter() as m:
        kept = step(mode, m)
    return m.peak_bytes - m.start_bytes, kept


def slope(xs, ys):
    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


def step_times(rounds):
    """Median CPU seconds per step, sqrt vs none side by side (and with a meter running)."""
    mlp = make_mlp(64, width=256)

    def timed(fn, *args, **kwargs):
        def run():
            fn(*args, **kwargs)
            return 1
        return run

    def metered(fn, *args):
        def run():
            with MemoryMeter():
                fn(*args)
            return 1
        return run

    candidates = {"mlp none": timed(mlp, None), "mlp sqrt": timed(mlp, "sqrt"),
                  "mlp none, meter on": metered(mlp, None), "meter alone": metered(lambda: None)}
    for name, config in LM_TIMED.items():
        lm = make_lm(**config)
        for mode in ("none", "sqrt"):
            candidates[f"{name} {mode}"] = timed(lm, mode)
            candidates[f"{name} {mode} forward"] = timed(lm, mode, backward=False)
    rates = interleaved(candidates, rounds=rounds, clock=time.process_time)
    return {name: 1 / r for name, r in rates.items()}


def print_lm_times(times):
    """The LM step times, and the sqrt step's extra time split into the recomputed forward and the rest."""
    for name, c in LM_TIMED.items():
        none, sqrt = times[f"{name} none"], times[f"{name} sqrt"]
        forward, forward_sqrt = times[f"{name} none forward"], times[f"{name} sqrt forward"]
        bounds = segment_bounds(c["steps"], "sqrt")
        recomputed = bounds[-2] / c["steps"]             # every segment but the last is run twice
        expected = forward_sqrt + recomputed * forward + (none - forward)
        print(f"  LM {name} (T={c['steps']}, hidden {c['hidden']}, embed {c['embed']}, batch {c['batch']}, vocab "
              f"{c['vocab']}): none {none * 1e3:.1f} ms, sqrt {sqrt * 1e3:.1f} ms, ratio {sqrt / none:.2f}x "
              "(target <= 1.4x)")
        print(f"      none = forward {forward * 1e3:.1f} + backward {(none - forward) * 1e3:.1f}; sqrt = forward "
              f"{forward_sqrt * 1e3:.1f} (segments without graph) + recomputed forward ~{recomputed * forward * 1e3:.1f} "
              f"({len(bounds) - 2} of {len(bounds) - 1} segments) + backward; left over "
              f"{(sqrt - expected) * 1e3:+.1f} ms (per-segment bookkeeping, smaller GEMMs)")


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
    b.loglog(t, [r[5] * mib for r in lstm_rows], "^:", label="LSTM-only recurrent: peak")
    b.loglog(t, [r[3] * mib for r in lstm_rows], "o--", label="none: kept after forward")
    b.loglog(t, [r[4] * mib for r in lstm_rows], "s--", label='"sqrt": kept after forward')
    b.set(xlabel="window T (time steps)", ylabel="MiB",
          title=f"LSTM LM step, hidden {LM['hidden']}, vocab {LM['vocab']}, batch {LM['batch']}")
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

    print(f"\nLSTM LM training step (forward_loss + backward): vocab {LM['vocab']}, embed {LM['embed']}, 1 layer "
          f"hidden {LM['hidden']}, batch {LM['batch']}, float32; peak per step and memory kept after forward")
    print(f"{'T':>6} {'none peak':>10} {'sqrt peak':>10} {'ratio':>7} {'none kept':>10} {'sqrt kept':>10} {'ratio':>7}"
          f" {'lstm-only peak':>15}   (MiB)")
    lstm_rows = []
    for steps in WINDOWS:
        (none, none_kept), (sqrt, sqrt_kept) = lm_peaks(steps, "none"), lm_peaks(steps, "sqrt")
        lstm_only = lm_peaks(steps, "lstm only")[0]
        lstm_rows.append((steps, none, sqrt, none_kept, sqrt_kept, lstm_only))
        print(f"{steps:>6} {none / 2 ** 20:>10.3f} {sqrt / 2 ** 20:>10.3f} {sqrt / none:>7.3f} "
              f"{none_kept / 2 ** 20:>10.3f} {sqrt_kept / 2 ** 20:>10.3f} {sqrt_kept / none_kept:>7.3f} "
              f"{lstm_only / 2 ** 20:>15.3f}")
    cols = list(zip(*lstm_rows))
    print(f"log-log slope vs T: peak none {slope(WINDOWS, cols[1]):.2f} (target ~1.0), sqrt {slope(WINDOWS, cols[2]):.2f} "
          f"(target <= 0.6), LSTM-only recurrent {slope(WINDOWS, cols[5]):.2f}; kept after forward none "
          f"{slope(WINDOWS, cols[3]):.2f}, sqrt {slope(WINDOWS, cols[4]):.2f}")
    print("  (sqrt peak = the parameter-sized gradients of a segment (constant) + one segment's activations and "
          "the carried (h, c) per segment, both O(sqrt(T)); the slope approaches 0.5 as T grows)")

    times = step_times(args.rounds)
    print(f"\nstep time (forward + backward), median CPU time of {args.rounds} interleaved rounds, no meter running:")
    print(f"  MLP N=64, width 256, batch {MLP_BATCH}: none {times['mlp none'] * 1e3:.1f} ms, "
          f"sqrt {times['mlp sqrt'] * 1e3:.1f} ms, ratio {times['mlp sqrt'] / times['mlp none']:.2f}x "
          "(target <= 1.4x; theory ~1.33x)")
    print_lm_times(times)
    print(f"  a MemoryMeter started and stopped around the MLP step (none) costs "
          f"{100 * (times['mlp none, meter on'] / times['mlp none'] - 1):+.1f}%, of which "
          f"{times['meter alone'] * 1e3:.2f} ms is start + stop alone")

    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "checkpointing_memory.png")
    plot(mlp_rows, lstm_rows, path)
    print(f"\nplot: {os.path.relpath(path)}")


if __name__ == "__main__":
    main()
