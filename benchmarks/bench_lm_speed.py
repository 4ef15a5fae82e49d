"""Training tokens/s of a job's language model: disttrain (its Trainer and the public nn API) vs the identical
PyTorch model, side by side, and how close each comes to the GEMM-bound limit.

    .venv/bin/python benchmarks/bench_lm_speed.py [--job jobs/ptb_small.toml] [--steps 20] [--rounds 9]
    .venv/bin/python benchmarks/bench_lm_speed.py --job jobs/charlm.toml --steps 5
    .venv/bin/python benchmarks/bench_lm_speed.py --job jobs/charlm_transformer.toml --steps 5

Candidates, run in interleaved rounds in one process (median per candidate; machine load hits all alike):
- "disttrain Trainer": `Trainer.train_step`, the loop every mode uses;
- "disttrain nn API": the same model written with dt.nn.Embedding / LSTM / Linear, F.cross_entropy,
  clip_grad_norm_ and the job's optimizer, in a plain loop (the Transformer: our model class, which is
  written with the public nn API);
- "pytorch": that plain loop with torch.nn (its CPU LSTM runs all steps in one oneDNN primitive; the
  Transformer's blocks are nn.TransformerEncoderLayer with norm_first, tanh GELU and a causal mask);
- "numpy GEMM": the step's largest GEMM shape in NumPy float32, for the GEMM rate of this run.
All train on the job's first TBPTT segments with the hidden state carried and detached, the job's
optimizer, lr, clip norm and loss convention.

The GEMM limit: a step's GEMM FLOPs (forward, plus twice that in backward: dX and dW) per token, at the
rate NumPy runs the step's largest GEMM in this run, is the tokens/s of a step that spent time on nothing
but GEMMs at that rate. Targets: >= 0.75 of it and >= 1.4x PyTorch.

The machine line names the BLAS kernels NumPy's OpenBLAS picked (OPENBLAS_CORETYPE=Haswell on an AVX-512
CPU makes its GEMMs ~1.8x slower: `env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE` for this command alone);
the load line gives the 1-minute load average before and after (the machine's other processes). On a
busy machine `--one-core` compares one thread per side by process CPU time, which other processes
disturb far less than wall time on shared cores (the GEMM rate is then one core's too). All sides
share this process's malloc: glibc's default, or with `--retain-freed-memory` what `disttrain run` sets
(freed blocks kept for the next step instead of faulted in again; bench_host_allocator.py).

Other model kinds: add an entry to MODELS (our nn-API model, the PyTorch twin, the GEMM shapes of a step).
"""
import argparse
import ctypes
import itertools
import os
import time

import disttrain as dt  # first, as in `disttrain run`: it sets OpenBLAS's idle-thread wait before NumPy loads it
import numpy as np
from harness import add_one_core_flag, interleaved, machine, one_core_clock, torch_or_none

from disttrain.kernels_cpu import native
from disttrain.tensor import backend
from disttrain.tensor.host_allocator import retain_freed_memory
from disttrain.train import Trainer, load_job

TARGET_GEMM_FRACTION, TARGET_RATIO = 0.75, 1.4


# ---- the LSTM language model (embedding -> LSTM layers -> linear decoder) ------------------------------

def lstm_lm_ours(spec, vocab):
    m = spec.model
    nn = dt.nn

    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding = nn.Embedding(vocab, m.embed)
            self.lstm = nn.LSTM(m.embed, m.hidden, m.layers, dropout=m.dropout)
            self.decoder = nn.Linear(m.hidden, vocab)
            for p in self.parameters():
                nn.init.uniform_(p, -m.init_scale, m.init_scale)

        def forward(self, x, state):
            out, state = self.lstm(self.embedding(x), state)
            return self.decoder(out.reshape((-1, m.hidden))), state

    return LM()


def lstm_lm_torch(torch, spec, vocab):
    m = spec.model

    class LM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding = torch.nn.Embedding(vocab, m.embed)
            self.lstm = torch.nn.LSTM(m.embed, m.hidden, m.layers, dropout=m.dropout)
            self.decoder = torch.nn.Linear(m.hidden, vocab)
            for p in self.parameters():
                torch.nn.init.uniform_(p, -m.init_scale, m.init_scale)

        def forward(self, x, state):
            out, state = self.lstm(self.embedding(x), state)
            return self.decoder(out.reshape(-1, m.hidden)), state

    return LM()


def lstm_lm_gemms(spec, vocab):
    """The forward GEMMs of a step as (M, K, N, count): per layer the input projection of all steps and
    the T recurrent products, then the decoder."""
    m, tokens = spec.model, spec.data.batch_size * spec.data.bptt
    gemms = []
    for k in range(m.layers):
        gemms.append((tokens, m.embed if k == 0 else m.hidden, 4 * m.hidden, 1))
        gemms.append((spec.data.batch_size, m.hidden, 4 * m.hidden, spec.data.bptt))
    gemms.append((tokens, m.hidden, vocab, 1))
    return gemms


# ---- the Transformer language model (token + position embeddings -> pre-LN blocks -> LayerNorm -> decoder) --

def transformer_lm_ours(spec, vocab):
    """Our model class itself: it is written with the public nn API (Embedding, Linear, LayerNorm, the ops)."""
    m = spec.model
    return dt.models.TransformerLanguageModel(vocab, d_model=m.d_model, heads=m.heads, layers=m.layers,
                                              d_ff=m.d_ff, max_len=m.max_len, dropout=m.dropout,
                                              tie_weights=m.tie_weights)


def transformer_lm_torch(torch, spec, vocab):
    """The same layout in torch.nn: TransformerEncoderLayer with norm_first, tanh GELU and a causal mask."""
    m, F = spec.model, torch.nn.functional

    class LM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding = torch.nn.Embedding(vocab, m.d_model)
            self.position = torch.nn.Embedding(m.max_len, m.d_model)
            self.blocks = torch.nn.ModuleList([torch.nn.TransformerEncoderLayer(
                m.d_model, m.heads, dim_feedforward=m.d_ff, dropout=m.dropout,
                activation=lambda x: F.gelu(x, approximate="tanh"), norm_first=True) for _ in range(m.layers)])
            self.norm = torch.nn.LayerNorm(m.d_model)
            self.decoder = torch.nn.Linear(m.d_model, vocab)
            if m.tie_weights:
                self.decoder.weight = self.embedding.weight

        def forward(self, x, state):
            steps = x.shape[0]
            mask = torch.nn.Transformer.generate_square_subsequent_mask(steps)
            h = self.embedding(x) + self.position.weight[:steps, None, :]
            for block in self.blocks:
                h = block(h, src_mask=mask, is_causal=True)
            return self.decoder(self.norm(h).reshape(-1, m.d_model)), None

    return LM()


def transformer_lm_gemms(spec, vocab):
    """Per block: the q/k/v and output projections, the attention scores and their weighted sum (one
    (T, d, T) and one (T, T, d) product per stream and head), the MLP's two; then the decoder."""
    m, batch, steps = spec.model, spec.data.batch_size, spec.data.bptt
    tokens, size = batch * steps, m.d_model // m.heads
    block = [(tokens, m.d_model, 3 * m.d_model, 1), (tokens, m.d_model, m.d_model, 1),
             (steps, size, steps, batch * m.heads), (steps, steps, size, batch * m.heads),
             (tokens, m.d_model, m.d_ff, 1), (tokens, m.d_ff, m.d_model, 1)]
    return block * m.layers + [(tokens, m.d_model, vocab, 1)]


def transformer_lm_describe(m):
    return f"{m.layers}-block Transformer (d_model {m.d_model}, {m.heads} heads, d_ff {m.d_ff})"


def lstm_lm_describe(m):
    return f"{m.layers}x{m.hidden} LSTM (embed {m.embed})"


# kind -> (our nn-API model, the PyTorch twin, the forward GEMMs of a step, a description)
MODELS = {"lstm_lm": (lstm_lm_ours, lstm_lm_torch, lstm_lm_gemms, lstm_lm_describe),
          "transformer_lm": (transformer_lm_ours, transformer_lm_torch, transformer_lm_gemms,
                             transformer_lm_describe)}


# ---- the runners ------------------------------------------------------------------------------------

def trainer_runner(trainer, segments):
    def run():
        for inputs, targets in segments:
            trainer.train_step(inputs, targets)
        return sum(t.size for _, t in segments)

    return run


def plain_loop(lib, model, optimizer, clip, segments, loss_times_steps):
    """A training loop written the way a user of `lib` (torch or disttrain) writes it."""
    F = lib.nn.functional
    params = list(model.parameters())
    state = [None]

    def run():
        for x, y in segments:
            logits, carried = model(x, state[0])
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad()
            (loss * x.shape[0] if loss_times_steps else loss).backward()
            if clip is not None:
                lib.nn.utils.clip_grad_norm_(params, clip)
            optimizer.step()
            state[0] = None if carried is None else tuple(t.detach() for t in carried)
        return sum(y.shape[0] for _, y in segments)

    return run


def optimizer_of(lib, spec, params):
    o = spec.optim
    if o.kind == "sgd":
        return lib.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    kind = lib.optim.Adam if o.kind == "adam" else lib.optim.AdamW
    return kind(params, lr=o.lr, weight_decay=o.weight_decay)


def nn_api_runner(spec, vocab, segments):
    dt.manual_seed(0)
    model = MODELS[spec.model.kind][0](spec, vocab)
    batches = [(dt.tensor(x), dt.tensor(y.reshape(-1))) for x, y in segments]
    return plain_loop(dt, model, optimizer_of(dt, spec, model.parameters()), spec.optim.clip_norm, batches,
                      spec.optim.loss == "sum_over_time")


def torch_runner(torch, spec, vocab, segments):
    torch.manual_seed(0)
    model = MODELS[spec.model.kind][1](torch, spec, vocab)
    batches = [(torch.tensor(x), torch.tensor(y).reshape(-1)) for x, y in segments]
    return plain_loop(torch, model, optimizer_of(torch, spec, model.parameters()), spec.optim.clip_norm, batches,
                      spec.optim.loss == "sum_over_time")


def gemm_runner(shape, min_seconds=0.05):
    """NumPy float32 (M, K) @ (K, N) repeated for about min_seconds; returns the FLOPs done."""
    m, k, n = shape
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((m, k), np.float32), rng.standard_normal((k, n), np.float32)
    out = np.empty((m, n), np.float32)
    np.matmul(a, b, out=out)
    start = time.perf_counter()
    repeats = 0
    while repeats < 3 or time.perf_counter() - start < min_seconds:
        np.matmul(a, b, out=out)
        repeats += 1

    def run():
        for _ in range(repeats):
            np.matmul(a, b, out=out)
        return 2 * m * k * n * repeats

    return run


def step_gemms(spec, vocab):
    """(GEMM FLOPs per token of a training step, the largest GEMM shape (M, K, N))."""
    forward = MODELS[spec.model.kind][2](spec, vocab)
    tokens = spec.data.batch_size * spec.data.bptt
    flops = 3 * sum(2 * m * k * n * count for m, k, n, count in forward)  # forward, then dX and dW
    largest = max(forward, key=lambda g: g[0] * g[1] * g[2])
    return flops / tokens, largest[:3]


def numpy_blas_threads():
    """The thread count of the OpenBLAS that NumPy loaded (its get_num_threads), or None where unknown."""
    try:
        with open("/proc/self/maps") as maps:
            paths = sorted({line.split()[-1] for line in maps if "openblas" in line.lower()})
    except OSError:
        return None
    for path in paths:
        lib = ctypes.CDLL(path)
        for name in ("scipy_openblas_get_num_threads64_", "openblas_get_num_threads64_", "openblas_get_num_threads"):
            if hasattr(lib, name):
                return getattr(lib, name)()
    return None


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", default="jobs/ptb_small.toml")
    parser.add_argument("--steps", type=int, default=20, help="TBPTT segments per timed round")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--paths", default="trainer,nn", help="which disttrain loops: trainer, nn or both")
    add_one_core_flag(parser)
    parser.add_argument("--retain-freed-memory", action="store_true",
                        help="glibc keeps freed memory, as `disttrain run` sets it (process-wide: PyTorch too)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = parser.parse_args()
    if args.retain_freed_memory and not retain_freed_memory():
        raise SystemExit("--retain-freed-memory: not set (not glibc, or MALLOC_* / LD_PRELOAD chose the allocator)")
    spec = load_job(args.job, args.overrides)
    torch = torch_or_none()
    clock = one_core_clock(args, dt, torch)
    if spec.model.kind not in MODELS:
        raise SystemExit(f"bench_lm_speed knows the model kinds {sorted(MODELS)}, not {spec.model.kind!r}")
    load_before = os.getloadavg()[0]
    trainer = Trainer.from_job(spec, progress=False)
    vocab = trainer.data.vocab_size
    segments = list(itertools.islice(iter(trainer.train_iter), args.steps))
    flops_per_token, largest = step_gemms(spec, vocab)
    candidates = {}
    if "trainer" in args.paths:
        candidates["disttrain Trainer"] = trainer_runner(trainer, segments)
    if "nn" in args.paths:
        candidates["disttrain nn API"] = nn_api_runner(spec, vocab, segments)
    if torch is not None:
        candidates["pytorch"] = torch_runner(torch, spec, vocab, segments)
    candidates["numpy GEMM"] = gemm_runner(largest)
    rates = interleaved(candidates, rounds=args.rounds, clock=clock)
    gemm_rate = rates.pop("numpy GEMM")
    limit = gemm_rate / flops_per_token
    load_after = os.getloadavg()[0]

    m, d = spec.model, spec.data
    print(f"LM training step, {args.job}: {MODELS[m.kind][3](m)}, vocab {vocab:,}, batch "
          f"{d.batch_size}, bptt {d.bptt}, {spec.optim.kind}; {machine()}")
    blas_team = "disttrain's team" if native.blas_jobs_on_our_threads() else "OpenBLAS's own threads"
    threads = (f"threads: NumPy's OpenBLAS {numpy_blas_threads() or '?'} (its jobs on {blas_team}), disttrain's "
               f"intra-op {dt.get_num_threads()} (the compiled kernels' row blocks, on their team); CPU kernels "
               f"{backend.CPU.kernels.__name__}")
    if torch is not None:
        threads += f"; torch intra-op {torch.get_num_threads()}"
    print("  " + threads)
    print(f"  GEMM: {flops_per_token / 1e6:.2f} MFLOP per token; NumPy's {largest[0]}x{largest[1]} @ "
          f"{largest[1]}x{largest[2]} float32 GEMM at {gemm_rate / 1e9:.0f} GFLOP/s in this run -> GEMM limit "
          f"{limit:,.0f} tokens/s")
    for name, rate in rates.items():
        line = f"  {name:18s} {rate:9,.0f} tokens/s   {rate / limit:.2f} of the GEMM limit"
        if "pytorch" in rates and name != "pytorch":
            line += f"   {rate / rates['pytorch']:.2f}x PyTorch"
        print(line)
    print(f"  targets: >= {TARGET_GEMM_FRACTION} of the GEMM limit, >= {TARGET_RATIO}x PyTorch; "
          f"load average (1 min) {load_before:.2f} before, {load_after:.2f} after, on {os.cpu_count()} cores"
          + ("; one thread per side, CPU time" if args.one_core else "; wall time")
          + ("; freed memory retained" if args.retain_freed_memory else "; glibc's default malloc"))


if __name__ == "__main__":
    main()
