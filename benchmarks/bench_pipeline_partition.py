"""How well the pipeline balancer's predicted stage costs match the stages' measured costs.

    .venv/bin/python benchmarks/bench_pipeline_partition.py [--job jobs/ptb_small.toml] [--repeats 7]

Two models: an uneven MLP (wide layers first, narrow ones last: an equal split by block count is
badly unbalanced) and the job's LSTM language model (vocabulary from its PTB files; a vocabulary of
10000 when they are absent), its loss on the last block. Each is profiled once and partitioned
into K = 2 and K = 4 stages; then every stage is built and its forward + backward on its own input
is timed (stages interleaved round by round, median round), and the measured largest/smallest
stage-time ratio is printed beside the profile's prediction.
BLAS runs on one thread unless OPENBLAS_NUM_THREADS is set (a pipeline stage is one rank on one core).
--clock cpu (the default) profiles and compares on this process's CPU time: on a machine running
more processes than cores, wall time of a long interval includes other processes' time slices
while a short block's often does not, so summed block times under-predict a stage's wall time.
"""
import argparse
import os
import statistics
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before NumPy loads BLAS
os.environ.setdefault("OMP_NUM_THREADS", "1")

from harness import machine  # noqa: E402

import disttrain as dt  # noqa: E402
from disttrain import nn  # noqa: E402
from disttrain.autograd.ops import cross_entropy  # noqa: E402
from disttrain.parallel.pipeline.partition import partition  # noqa: E402
from disttrain.parallel.pipeline.profile import profile  # noqa: E402
from disttrain.tensor.creation import ones_like  # noqa: E402
from disttrain.train import load_job  # noqa: E402
from disttrain.train.build import build_corpus, build_model  # noqa: E402
from disttrain.train.jobspec import JobSpecError  # noqa: E402


def uneven_mlp(batch=64):
    """Linear+ReLU blocks: 20 layers of width 1024, 24 of 512, 32 of 256 (per-layer cost 16 : 4 : 1)."""
    widths = [1024] * 21 + [512] * 24 + [256] * 32
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

    return run


def measure_stages(model, part, x, loss_fn, rounds):
    """Per stage: median (wall s, CPU s) of `rounds` interleaved rounds, each stage fed the previous one's output."""
    runners = []
    for k in range(part.stages):
        stage = part.build_stage(model, k)
        if k:  # a stage past the first computes its input's gradient, to send it back
            x = x.detach().requires_grad_()
        runners.append(stage_runner(stage, x, loss_fn if k == part.stages - 1 else None))
        with dt.no_grad():
            x, _ = stage(x)
    times = [[] for _ in runners]
    for _ in range(rounds + 1):  # the first round warms up
        for k, run in enumerate(runners):
            wall, cpu = time.perf_counter(), time.process_time()
            run()
            times[k].append((time.perf_counter() - wall, time.process_time() - cpu))
    return [tuple(statistics.median(t[c] for t in ts[1:]) for c in (0, 1)) for ts in times]


def ratio(values):
    return max(values) / min(values)


def report(title, model, x, loss_fn, repeats, clock):
    print(f"\n=== {title}")
    prof = profile(model, x, repeats=repeats, loss_fn=loss_fn, clock=clock)
    print(prof.table())
    for stages in (2, 4):
        part = partition(model, x, stages, profiled=prof)
        print("\n" + part.describe())
        predicted = [part.stage_compute(k) for k in range(stages)]
        measured = measure_stages(model, part, x, loss_fn, repeats)
        same_clock = [m[1] if clock == "cpu" else m[0] for m in measured]
        n = len(prof.blocks)
        equal = [sum(prof.costs()[k * n // stages:(k + 1) * n // stages]) for k in range(stages)]
        print(f"stage ms, predicted / measured on the {clock} clock (wall): "
              + ", ".join(f"{p * 1e3:.1f} / {m * 1e3:.1f} ({w * 1e3:.1f})"
                          for p, m, (w, _) in zip(predicted, same_clock, measured)))
        print(f"K={stages}: largest/smallest stage time: predicted {ratio(predicted):.3f}, measured "
              f"{ratio(same_clock):.3f} ({clock}), {ratio([w for w, _ in measured]):.3f} (wall); "
              f"equal block counts would give {ratio(equal):.2f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--job", default="jobs/ptb_small.toml")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                        help="what the profile measures and the stages are compared on (default: this "
                             "process's CPU time, meaningful on a machine with more processes than cores)")
    args = parser.parse_args()
    print(machine())
    report("uneven MLP (widths 1024 x20, 512 x24, 256 x32; batch 64)", *uneven_mlp(), args.repeats, args.clock)
    report(f"LSTM LM of {args.job} (loss on the last block)", *job_lm(args.job), args.repeats, args.clock)


if __name__ == "__main__":
    main()
