"""`disttrain plan JOB [--ranks N] [--budget-mb X] [--set k=v ...]`: the memory estimate of every rank, without
training.

It builds the job's model, data and optimizer in this one process, profiles one forward/backward of a rank's
micro-batch (disttrain.train.memory_plan.profile_step), with the model's activation checkpointing as `run`
sets it ("auto": planned for [memory] budget_mb first, the plan printed), and prints, per rank of the job's
mode, what a rank
holds: parameters, gradients, optimizer state, activations and the predicted peak, the figures `disttrain
run` logs at start and writes to memory.json. Where the model is a chain of blocks (an nn.Sequential, a model
family's pipeline_blocks()), its blocks' activations on that micro-batch follow (each block run on its own, as
a pipeline stage runs it: the pipeline's profile). A pipeline is cut as `run` cuts it (split_points, or the
balancer on a profile), and each stage's step is measured on two of its micro-batches and replayed over its
schedule, as PipelineMode does at prepare (disttrain.parallel.pipeline.stage_memory).

Exit status 0 when the largest rank's predicted peak fits --budget-mb (default: [memory] budget_mb; none: no
check), 2 with a one-line error naming the MiB needed when it does not, or for an unusable job or option.
"""
import argparse
import sys

import disttrain as dt
from disttrain.data.source import Share
from disttrain.models import protocol
from disttrain.parallel.data_mode import data_parallel_holding
from disttrain.parallel.mpi_job import check_ranks
from disttrain.parallel.mpi_mode import ranks as count_ranks
from disttrain.parallel.pipeline.blocks import blocks_of
from disttrain.parallel.pipeline.partition import CutError, partition
from disttrain.parallel.pipeline.pipeline_mode import check_enough_blocks, cut_error, user_partition
from disttrain.parallel.pipeline.profile import profile
from disttrain.parallel.pipeline.runtime import split_micro_batches
from disttrain.parallel.pipeline.stage_memory import stage_holding, stage_step_bytes
from disttrain.train import memory_plan
from disttrain.train.auto_checkpointing import plan_checkpointing
from disttrain.train.build import build_data, build_model, build_optimizer, describe_model
from disttrain.train.jobspec import JobSpecError
from disttrain.cli.common import add_job_arguments, fail, load_job_for
from disttrain.cli.exit_codes import EXIT_DONE, EXIT_USAGE


def register(sub):
    plan = sub.add_parser("plan", help="print each rank's memory estimate of a job without training",
                          description="Estimate the memory each rank of the job needs (parameters, gradients, "
                                      "optimizer state, activations per block, the predicted peak) from one "
                                      "profiled forward/backward of a micro-batch, without training. Exit status 2 "
                                      "when the largest rank's predicted peak exceeds the budget.")
    add_job_arguments(plan, set_example="parallel.shard_optimizer=1")
    plan.add_argument("--ranks", type=int, metavar="N",
                      help="processes the job runs on (default: [parallel] stages for a pipeline, [ps] workers "
                           "for a parameter-server job, else 1)")
    plan.add_argument("--budget-mb", type=_positive_mib, metavar="X",
                      help="MiB a rank may use (default: [memory] budget_mb; neither: no check)")


def _positive_mib(text):
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < float("inf"):                # nan fails both comparisons
        raise argparse.ArgumentTypeError(f"expected a number of MiB > 0, got {text!r}")
    return value


def main(args):
    try:
        spec = load_job_for(args, "plan")
        ranks = _ranks(spec, args.ranks)
        rows, blocks, choice = estimate_ranks(spec, ranks)
    except JobSpecError as exc:
        return fail("plan", exc)
    print(f"job {spec.source}: model {describe_model(spec)}; {spec.parallel.mode} mode on {ranks} "
          f"rank{'s' if ranks > 1 else ''}")
    if choice is not None:
        print(f"activation checkpointing for [memory] budget_mb = {spec.memory.budget_mb:g}: {choice.describe()}")
    for who, detail, need in rows:
        print("\n".join(need.lines(f"memory of {who}{detail}:")))
    if blocks:
        print("activations per block (one micro-batch, each block on its own): "
              + ", ".join(f"{name} {memory_plan.format_bytes(n)}" for name, n in blocks))
    budget = args.budget_mb if args.budget_mb is not None else spec.memory.budget_mb
    who, _, worst = max(rows, key=lambda row: row[2].predicted_peak)
    if budget is not None and worst.predicted_peak > budget * 2**20:
        where = "--budget-mb" if args.budget_mb is not None else f"{spec.source}: [memory] budget_mb"
        print(f"disttrain plan: error: {who} needs {worst.predicted_peak / 2**20:.1f} MiB at its predicted peak, over "
              f"{where} = {budget:g}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_DONE


def _ranks(spec, ranks):
    """The processes to plan for (--ranks, else the job's), checked as `run` and ps-cluster check them."""
    mode = spec.parallel.mode
    option = "--ranks" if ranks is not None else None
    if ranks is None:
        ranks = spec.parallel.stages if mode == "pipeline" else spec.ps.workers if mode == "ps" else 1
    if ranks < 1:
        raise JobSpecError(f"--ranks {ranks}: expected a number of processes >= 1")
    if mode == "local" and ranks != 1:
        raise JobSpecError(f'--ranks {ranks}: {spec.source}: [parallel] mode = "local" runs on one process; '
                           'set parallel.mode="data" (or "pipeline") to plan for more')
    if mode == "ps":
        from disttrain.paramserver.job import check_shards     # on demand: it loads the servers' messaging

        check_shards(spec, ranks, option)
    check_ranks(spec, ranks, option)
    return ranks


def estimate_ranks(spec, ranks):
    """([(who, detail, MemoryEstimate)] one per kind of rank, [(block name, activation bytes)] or [], the "auto"
    checkpointing plan's BudgetChoice or None) of the job."""
    data = build_data(spec)
    dt.manual_seed(spec.train.seed)
    model = build_model(spec, data).to(spec.train.device)
    mode = spec.parallel.mode
    if mode == "pipeline":
        return _pipeline_ranks(spec, data, model, ranks)
    shares = ranks if mode in ("data", "ps") else 1
    inputs, targets = _first_batch(data, Share(0, shares))
    optimizer = build_optimizer(spec, model.parameters())
    holding = (data_parallel_holding(ranks, spec.parallel.shard_optimizer, spec.parallel.bucket_mb) if mode == "data"
               else memory_plan.holding_for(mode))
    choice = plan_checkpointing(spec, model, data, Share(0, shares), holding, optimizer)  # "auto": as `run` plans it
    profiled = memory_plan.profile_step(model, inputs, targets, holding=holding)
    need = memory_plan.predict(model, optimizer, profiled, holding)
    sharded = f", ZeRO stage {spec.parallel.shard_optimizer}" if spec.parallel.shard_optimizer else ""
    workers = f"{ranks} worker{'s' if ranks != 1 else ''}"
    who, detail = {"local": ("the process", " (local)"),
                   "data": ("each data-parallel rank", f" ({count_ranks(ranks)}{sharded})"),
                   "ps": ("each parameter-server worker", f" ({workers}; the servers hold the optimizer)")}[mode]
    return [(who, detail, need)], _block_activations(model, data, inputs, targets), choice


def _pipeline_ranks(spec, data, model, ranks):
    p = spec.parallel
    check_enough_blocks(model, p.stages, spec.source)               # as PipelineMode.prepare checks them
    replica_inputs, replica_targets = _first_batch(data, Share(0, ranks // p.stages))
    inputs, targets = (split_micro_batches(a, p.micro_batches, data.batch_axis)[0]
                       for a in (replica_inputs, replica_targets))
    x, loss = _sample(model, data, inputs, targets)
    by_block = [b.activation_bytes for b in profile(model, x, repeats=1, loss_fn=loss).blocks]
    device = next(iter(model.parameters())).device
    loss_fn = lambda output, y: protocol.output_loss(model, output, dt.tensor(y, device=device))  # noqa: E731
    rows = []
    try:
        cut = (user_partition(model, p.stages, p.split_points, spec.source) if p.split_points is not None else
               partition(model, x, p.stages, repeats=1, statistic="min", loss_fn=loss))
        steps = [stage_step_bytes(model, cut, k, replica_inputs, replica_targets, loss_fn, p.schedule, p.micro_batches,
                                  data.batch_axis, ranks // p.stages, p.stage_checkpointing, device)
                 for k in range(p.stages)]
    except CutError as exc:                                          # as PipelineMode.prepare reports it
        raise cut_error(exc, p.stages, p.split_points, spec.source) from None
    for k, step in enumerate(steps):
        stage = cut.build_stage(model, k)
        need = memory_plan.predict(stage, build_optimizer(spec, stage.parameters()), None, stage_holding(k, step))
        rows.append((f"pipeline stage {k}", f" ({', '.join(cut.stage_blocks(k))}; {step.in_flight} micro-batch"
                     f"{'es' if step.in_flight > 1 else ''} in flight)", need))
    return rows, list(zip(cut.block_names, by_block)), None


def _first_batch(data, share):
    try:
        return next(iter(data.train_batches(share)))
    except StopIteration:
        raise JobSpecError(f"the training data has no batch for a share of 1/{share.count}: lower --ranks or "
                           "[data] batch_size") from None


def _block_activations(model, data, inputs, targets):
    """[(block name, bytes its forward keeps)] of a model that is a chain of blocks; [] for any other."""
    try:
        blocks_of(model)
    except TypeError:
        return []
    x, loss = _sample(model, data, inputs, targets)
    return [(b.name, b.activation_bytes) for b in profile(model, x, repeats=1, loss_fn=loss).blocks]


def _sample(model, data, inputs, targets):
    """The micro-batch as the model's input tensor and the loss function of its output (the pipeline's profile's
    arguments)."""
    device = next(iter(model.parameters())).device
    y = dt.tensor(targets, device=device)
    return dt.tensor(inputs, device=device), lambda output: protocol.output_loss(model, output, y)
