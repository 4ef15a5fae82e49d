"""How well the pipeline balancer's predicted stage costs match the stages' measured costs.

    .venv/bin/python benchmarks/bench_pipeline_partition.py [--job jobs/ptb_small.toml] [--repeats 7]

Two models: an uneven MLP (wide layers first, narrow ones last: an equal split by block count is
badly unbalanced) and the job's LSTM language model (vocabulary from its PTB files; a vocabulary of
10000 when they are absent), its loss on the last block. Each is profiled once and partitioned
into K = 2 and K = 4 stages; then every stage is built and its forward + backward on its own input
is timed (stages interleaved, median round: harness.interleaved), and the measured largest/smallest
stage-time ratio is printed beside the profile's prediction.
BLAS runs on one thread unless OPENBLAS_NUM_THREADS is set (a pipeline stage is one rank on one core).
"""
import argparse
import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before NumPy loads BLAS
os.environ.setdefault("OMP_NUM_THREADS", "1")

from harness import interleaved, machine  # noqa: E402

import disttrain as dt  # noqa: E402
from disttrain import nn  # noqa: E402
from disttrain.autograd.ops import cross_entropy  # noqa: E402
from disttrain.parallel.pipeline.partition import partition  # noqa: E402
from disttrain.parallel.pipeline.profile import profile  # noqa: E402
from disttrain.tensor.creation import ones_like  # noqa: E402
from disttrain.train import load_job  # noqa: E402
from disttrain.train.build import build_corpus, build_model  # noqa: E402
from disttrain.train.jobspec import JobSpecError  # noqa: E402


def uneven_mlp(batch=128):
    """Linear+ReLU blocks: 10 layers of width 1024, 12 of 512, 16 of 256 (per-layer cost 16 : 4 : 1)."""
    widths = [1024] * 11 + [512] * 12 + [256] * 16
    dt.manual_seed(0)
    layers = []
    for fan_in, fan_out in zip(widths, widths[1:]):
        layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
    return nn.Sequential(*layers), dt.randn(batch, widths[0]), None


def job_lm(job):
    """The job's language model on one (bptt, batch) segment of random tokens, and its loss."""
    spec = load_job(job)
    try:
        vocab = len(build_corpus(spec).vocab)
    except JobSpecError as exc:
        print(f"(no PTB files: {str(exc)[:120]}...; using a vocabulary of 10000)")
        vocab = 10000
    dt.manual_seed(spec.train.seed)
    model = build_model(spec, vocab)
    steps, batch = spec.data.bptt, spec.data.batch_size
    tokens, targets = dt.randint(0, vocab, (steps, batch)), dt.randint(0, vocab, (steps * batch,))
    print(f"{job}: vocab {vocab}, hidden {spec.model.hidden}, layers {spec.model.layers}, segment ({steps}, {batch})")
    return model, tokens, lambda logits: cross_entropy(logits, targets)


def stage_runner(stage, x, loss_fn):
    """fn() running the stage's forward + backward on input x (what one micro-batch costs it)."""
    def run():
        stage.zero_grad()
        y, _ = stage(x)
        out = loss_fn(y) if loss_fn is not None else y
        out.backward(None if out.ndim == 0 else ones_like(out))
        return 1

    return run


def measure_stages(model, part, x, loss_fn, rounds):
    """Seconds per stage (median of interleaved rounds), each stage fed the previous stage's output."""
    candidates = {}
    for k in range(part.stages):
        stage = part.build_stage(model, k)
        if k:  # a stage past the first computes its input's gradient, to send it back
            x = x.detach().requires_grad_()
        last = k == part.stages - 1
        candidates[k] = stage_runner(stage, x, loss_fn if last else None)
        with dt.no_grad():
            x, _ = stage(x)
    rates = interleaved(candidates, rounds=rounds)
    return [1 / rates[k] for k in range(part.stages)]


def report(title, model, x, loss_fn, repeats):
    print(f"\n=== {title}")
    prof = profile(model, x, repeats=repeats, loss_fn=loss_fn)
    print(prof.table())
    for stages in (2, 4):
        part = partition(model, x, stages, profiled=prof)
        print("\n" + part.describe())
        predicted = [part.stage_compute(k) for k in range(stages)]
        measured = measure_stages(model, part, x, loss_fn, repeats)
        n = len(prof.blocks)
        equal = [sum(prof.costs()[k * n // stages:(k + 1) * n // stages]) for k in range(stages)]
        print("stage ms predicted / measured: "
              + ", ".join(f"{p * 1e3:.2f} / {m * 1e3:.2f}" for p, m in zip(predicted, measured)))
        print(f"K={stages}: largest/smallest stage time: predicted {max(predicted) / min(predicted):.3f}, "
              f"measured {max(measured) / min(measured):.3f} (equal block counts would give "
              f"{max(equal) / min(equal):.2f})")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--job", default="jobs/ptb_small.toml")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    print(machine())
    report("uneven MLP (widths 1024 x10, 512 x12, 256 x16; batch 128)", *uneven_mlp(), args.repeats)
    report(f"LSTM LM of {args.job} (loss on the last block)", *job_lm(args.job), args.repeats)


if __name__ == "__main__":
    main()
