"""Training tokens/s of a job's LSTM language model, disttrain's Trainer vs the identical PyTorch model.

    .venv/bin/python benchmarks/bench_lm_speed.py [--job jobs/ptb_small.toml] [--steps 30] [--rounds 5]

Both sides train the same architecture (embedding -> LSTM layers -> linear decoder), the same
batch/bptt, SGD with the job's lr and clip norm and the job's loss convention, on the job's first
TBPTT segments with the hidden state carried and detached. disttrain runs `Trainer.train_step`
(the loop every mode uses); PyTorch runs the equivalent step with torch.nn.LSTM (its CPU kernels).
Rounds are interleaved; the median tokens/s of each side and the ratio are printed (target >= 1.2).
Both sides' thread counts are printed too: NumPy's OpenBLAS and torch's intra-op pool default to
the core count (GEMMs on every core on both sides); disttrain splits its big elementwise passes
over as many threads (disttrain.tensor.threads), torch runs them on its pool. Run it on a quiet machine:
multi-threaded BLAS on cores that other processes also use slows down far more than the work it shares
(small GEMMs most of all).

The printed machine line names the GEMM kernels NumPy's OpenBLAS picked. Some machines set
OPENBLAS_CORETYPE=Haswell for old OpenBLAS builds; a current one then runs AVX2 kernels on an AVX-512
CPU and the decoder's GEMMs take ~1.8x as long, while PyTorch's MKL picks its own kernels. To compare
the two on the CPU's own kernels, unset both variables for this command alone:

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python benchmarks/bench_lm_speed.py

Both sides share this process's malloc (glibc's default here; `disttrain run` retains freed memory on
top: benchmarks/bench_host_allocator.py measures that separately).
"""
import argparse
import ctypes
import itertools

from harness import interleaved, machine, torch_or_none

import disttrain as dt
from disttrain.train import Trainer, load_job


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


def our_runner(trainer, steps):
    segments = itertools.cycle(list(itertools.islice(iter(trainer.train_iter), steps)))

    def run():
        tokens = 0
        for _ in range(steps):
            inputs, targets = next(segments)
            trainer.train_step(inputs, targets)
            tokens += targets.size
        return tokens

    return run


def torch_runner(torch, spec, vocab, segments_list):
    m, o = spec.model, spec.optim
    torch.manual_seed(0)

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

    model = LM()
    opt = torch.optim.SGD(model.parameters(), lr=o.lr)
    segments = itertools.cycle([(torch.tensor(x), torch.tensor(y).reshape(-1)) for x, y in segments_list])
    state = [None]

    def run():
        tokens = 0
        for _ in range(len(segments_list)):
            x, y = next(segments)
            logits, (h, c) = model(x, state[0])
            loss = torch.nn.functional.cross_entropy(logits, y)
            opt.zero_grad()
            (loss * x.shape[0] if o.loss == "sum_over_time" else loss).backward()
            if o.clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), o.clip_norm)
            opt.step()
            state[0] = (h.detach(), c.detach())
            tokens += y.numel()
        return tokens

    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", default="jobs/ptb_small.toml")
    parser.add_argument("--steps", type=int, default=30, help="TBPTT segments per timed round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    args = parser.parse_args()
    spec = load_job(args.job, args.overrides)
    if spec.optim.kind != "sgd" or spec.optim.momentum:
        raise SystemExit("bench_lm_speed compares plain SGD jobs (like ptb_small)")
    trainer = Trainer.from_job(spec, progress=False)
    candidates = {"disttrain": our_runner(trainer, args.steps)}
    torch = torch_or_none()
    if torch is not None:
        segments = list(itertools.islice(iter(trainer.train_iter), args.steps))
        candidates["pytorch"] = torch_runner(torch, spec, trainer.data.vocab_size, segments)
    rates = interleaved(candidates, rounds=args.rounds)
    m, d = spec.model, spec.data
    print(f"LM training step, {args.job}: {m.layers}x{m.hidden} LSTM, vocab {trainer.data.vocab_size:,}, "
          f"batch {d.batch_size}, bptt {d.bptt}, SGD; {machine()}")
    threads = (f"threads: NumPy's OpenBLAS {numpy_blas_threads() or '?'}, disttrain's intra-op "
               f"{dt.get_num_threads()} (big elementwise passes; the LSTM recurrence's small GEMMs on 1)")
    if torch is not None:
        threads += f", torch intra-op {torch.get_num_threads()} (GEMMs and elementwise)"
    print("  " + threads)
    for name, rate in rates.items():
        print(f"  {name:10s} {rate:9.0f} tokens/s")
    if "pytorch" in rates:
        print(f"  ratio disttrain / pytorch = {rates['disttrain'] / rates['pytorch']:.2f}x  (target >= 1.2)")


if __name__ == "__main__":
    main()
