"""How much memory a training process needs: one place for the estimate, from the job alone or from a profile.

From the job alone, before anything is allocated (what `disttrain run` checks first, cli/preflight.py):

    need = estimate(spec, vocab_size, streams=spec.data.batch_size)
    need.parameters, need.gradients, need.optimizer, need.activations, need.total      # bytes, one process
    check_fits(spec, vocab_size, streams=10, processes=2)    # JobSpecError when the machine cannot hold it

From one profiled forward/backward of the process's micro-batch (what the Trainer logs at start and writes to
memory.json, and what `disttrain plan` prints):

    profile = profile_step(model, inputs, targets)           # a MemoryMeter around one forward and backward
    need = predict(trained_module, optimizer, profile, mode.memory_holding())
    need.peak                                                 # the predicted peak of a step, bytes
    need.to_json(measured_peak_bytes)                         # memory.json's fields

What a prediction counts, per process (all of it array bytes as disttrain.tensor.memory.MemoryMeter counts
them, plus the optimizer's state arrays, which it does not see):
- params_bytes: the parameters and buffers of what this process trains (a pipeline stage's only);
- grads_bytes: one gradient per trained parameter; ZeRO stage 2 ([parallel] shard_optimizer = 2) keeps 1/N;
- optimizer_state_bytes: the optimizer's parameter-shaped buffers (Optimizer.state_buffers: Adam 2, SGD with
  momentum 1); 1/N of them with shard_optimizer >= 1; none on a parameter-server worker (the servers update);
- activation_bytes: what the profiled forward leaves alive for backward (with the model's activation
  checkpointing as configured), the loss included; a pipeline stage: what one micro-batch keeps until its
  backward (receive buffers included) times the micro-batches its schedule keeps in flight;
- peak: the parameters and optimizer state plus the profiled forward/backward's peak above the parameters
  (`working`: activations, gradients as backward makes them, temporaries held between ops); gradients that
  stay in buffers through the step (data parallelism's buckets) add to it, otherwise the larger of the two
  counts, since a step starts with its gradients cleared. ZeRO stage 2 (Holding.gradients_kept False): the
  profile's backward keeps each final gradient's 1/N share and drops it (held_gradients), as the Reducer does,
  and the send rows of the buckets in flight are imitated in it where the mode gives its bucket layout (else
  gradient_rows_bytes bounds them). A pipeline stage: parameters,
  optimizer state and its step's peak as PipelineMode measured it on two micro-batches and replayed it over
  the schedule (Holding.step_bytes; disttrain.parallel.pipeline.stage_memory).
The measured peak (Trainer, `measured_peak_bytes`) is the same sum as it happened: a metered step's
MemoryMeter peak (absolute: parameters, buffers, gradients, carried state, activations, and the communication
buffers the meter is told of: stage 2's send rows and received slices, a pipeline's posted receives and
replica-mean buffer) plus the optimizer's state bytes (Optimizer.state_nbytes) after the step.

What the job-alone estimate counts, in float32 (4 bytes a number), for a model family a job names by [model]
kind (the family's own formulas are in its record, train/families.py):
- parameters: exactly, from [model] (ModelFamily.parameter_count; the LSTM LM: embedding V x E, per layer
  4H x (in + H) weights and two 4H biases, decoder H x V + V, its weight shared with the embedding when tied;
  the Transformer LM: token and position embeddings, per block the attention's in and out projections, the
  MLP's two layers and two LayerNorms, the final LayerNorm and the decoder);
- gradients: one array per parameter; optimizer state: none for plain SGD, one buffer with momentum, two
  for Adam and AdamW;
- activations of one training step on `streams` streams of `bptt` tokens, what backward keeps plus the
  largest temporaries (ModelFamily.activation_floats, per stream): the LSTM LM's per time step and stream the
  embedding (E), per layer the input, gates and cell states (in + 8H, and H for a dropout mask), and the
  logits and their gradient (2V), sequence checkpointing ([memory] activation_checkpointing) keeping the last
  segment of T/S steps and one recomputed in backward, plus the S carried states; the Transformer LM's per
  token and block 9 D + 2 F, with checkpointing over blocks;
- a model a factory builds: no estimate (None) until it is built; the profiled prediction covers it;
- a pipeline stage (one of `stages`): the whole model's parameters (every rank builds the whole model before
  keeping its stage) and a stage's share of the rest.
It is meant to refuse a job that cannot fit (a hidden size of 100,000 needs terabytes) before NumPy fails
mid-allocation, not to budget tightly: tests/train/test_memory_plan.py checks it against the parameters a model
has and the bytes the memory meter sees a step allocate; the profiled prediction is the tight one
(tests/train/test_memory_estimate.py).
"""
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import disttrain as dt
from disttrain.fsutil import write_atomically
from disttrain.models import protocol
from disttrain.nn.utils import preserved_buffers
from disttrain.tensor import memory
from disttrain.tensor.memory import MemoryMeter
from disttrain.tensor.random import fork_rng, get_rng_state
from disttrain.train.families import family_of
from disttrain.train.jobspec import JobSpecError

__all__ = ["MemoryEstimate", "estimate", "parameter_count", "available_bytes", "check_fits", "format_bytes",
           "Holding", "holding_for", "StepProfile", "profile_step", "held_gradients", "gradient_rows_bytes", "predict",
           "write_memory_json", "MEMORY_FILE"]

MEMORY_FILE = "memory.json"

FLOAT_BYTES = 4
OPTIMIZER_BUFFERS = {"sgd": 0, "adam": 2, "adamw": 2}


@dataclass(frozen=True)
class MemoryEstimate:
    parameters: int       # bytes
    gradients: int
    optimizer: int
    activations: int
    peak: int = None      # the predicted peak of a step (a profiled prediction); None: the sum of the four

    @property
    def total(self):
        return self.parameters + self.gradients + self.optimizer + self.activations

    @property
    def predicted_peak(self):
        return self.total if self.peak is None else self.peak

    def describe(self):
        return (f"parameters {format_bytes(self.parameters)}, gradients {format_bytes(self.gradients)}, optimizer "
                f"state {format_bytes(self.optimizer)}, activations {format_bytes(self.activations)}")

    def lines(self, title):
        """The block of log lines printed at start: `title`, then one figure a line."""
        rows = [("parameters", self.parameters), ("gradients", self.gradients), ("optimizer state", self.optimizer),
                ("activations", self.activations), ("predicted peak", self.predicted_peak)]
        return [title] + [f"  {name:<16}{format_bytes(n):>12}" for name, n in rows]

    def to_json(self, measured_peak_bytes=None):
        """memory.json's fields (measured_peak_bytes only once a step was metered)."""
        fields = {"params_bytes": self.parameters, "grads_bytes": self.gradients,
                  "optimizer_state_bytes": self.optimizer, "activation_bytes": self.activations,
                  "predicted_peak_bytes": self.predicted_peak}
        if measured_peak_bytes is not None:
            fields["measured_peak_bytes"] = int(measured_peak_bytes)
        return fields


def parameter_count(spec, vocab_size):
    """The number of parameters of the job's model (exact for the families; None for a factory's model)."""
    m = spec.model
    if m.factory is not None:
        return None
    return family_of(m.kind).parameter_count(m, vocab_size)


def estimate(spec, vocab_size, streams, stages=1):
    """The MemoryEstimate of one process training the job on `streams` streams of each batch (as one of
    `stages` pipeline stages); None for a model a factory builds (its size is known once it is built)."""
    count = parameter_count(spec, vocab_size)
    if count is None:
        return None
    params = count * FLOAT_BYTES
    buffers = OPTIMIZER_BUFFERS[spec.optim.kind] + (1 if spec.optim.kind == "sgd" and spec.optim.momentum else 0)
    share = lambda n: -(-n // stages)          # noqa: E731
    gradients, optimizer = share(params), share(buffers * params)
    activations = share(_activation_bytes(spec, vocab_size, streams))
    if spec.memory.activation_checkpointing == "auto":  # it plans the step to what the budget leaves, at most
        activations = min(activations, max(0, int(spec.memory.budget_mb * 2**20) - params - gradients - optimizer))
    return MemoryEstimate(params, gradients, optimizer, activations)


def _activation_bytes(spec, vocab_size, streams):
    return family_of(spec.model.kind).activation_floats(spec, vocab_size) * streams * FLOAT_BYTES


# ---- the profiled prediction ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Holding:
    """How one process of a mode holds the memory of what it trains (Mode.memory_holding; see holding_for)."""
    gradients: float = 1.0           # its share of the trained parameters' gradients
    optimizer_state: float = 1.0     # its share of the optimizer's state
    gradient_buffers: bool = False   # gradients live in buffers kept through the whole step
    activation_bytes: int = None     # the mode's own activation figure (a pipeline stage); None: the profile's
    description: str = "local"
    gradients_kept: bool = True      # False (ZeRO stage 2): a gradient, once final, is packed into send rows and
                                     # dropped; only its `gradients` share is kept (the received slice)
    rows_buckets: int = None         # with gradients_kept False: the most buckets whose full-size send rows are
                                     # alive at once (None: every bucket's)
    bucket_bytes: float = 0.0        # their size cap ([parallel] bucket_mb in bytes)
    bucket_layout: object = None     # with gradients_kept False: the Reducer's layout, named_params -> [[index]]
                                     # (parallel.buckets.bucket_layout), so held_gradients imitates the send rows
    step_bytes: int = None           # a pipeline stage's measured step peak above its parameters (gradients,
                                     # activations in flight, messages); None: from the activation figure


def holding_for(mode, ranks=1, shard_optimizer=0, stage_activation_bytes=None, in_flight=1, stage=0,
                rows_buckets=None, bucket_mb=25.0, step_bytes=None, bucket_layout=None):
    """The Holding of one process of `mode` ("local", "data", "pipeline", "ps"): the rules of docs/MEMORY.md.
    data: `ranks` ranks, ZeRO stage `shard_optimizer`; stage 2 holds the send rows of at most `rows_buckets`
    gradient buckets of `bucket_mb` MiB at once (None: all; the Reducer's bound, parallel.buckets), laid out by
    `bucket_layout` (named_params -> [[index]]; given, the profile imitates the rows);
    pipeline: stage `stage`, whose blocks keep `stage_activation_bytes` per micro-batch (None: not profiled) for
    `in_flight` micro-batches at once, and whose step peaks `step_bytes` above its parameters where measured
    (disttrain.parallel.pipeline.stage_memory)."""
    if mode == "data":
        share = 1.0 / ranks
        sharded = f", ZeRO stage {shard_optimizer}" if shard_optimizer else ""
        description = f"data parallel, {ranks} ranks{sharded}"
        if shard_optimizer == 2:
            return Holding(gradients=share, optimizer_state=share, gradients_kept=False, rows_buckets=rows_buckets,
                           bucket_bytes=bucket_mb * 2**20, bucket_layout=bucket_layout, description=description)
        return Holding(optimizer_state=share if shard_optimizer else 1.0, gradient_buffers=True,
                       description=description)
    if mode == "ps":
        return Holding(optimizer_state=0.0, description="parameter-server worker (the servers hold the optimizer)")
    if mode == "pipeline":
        activations = None if stage_activation_bytes is None else stage_activation_bytes * in_flight
        return Holding(activation_bytes=activations, step_bytes=step_bytes,
                       description=f"pipeline stage {stage}, {in_flight} micro-batch(es) in flight")
    return Holding()


@dataclass(frozen=True)
class StepProfile:
    """One forward and backward of a micro-batch under a MemoryMeter (bytes)."""
    resident: int      # parameters and buffers alive when it started
    activations: int   # alive after forward and not before: what backward keeps, the loss
    working: int       # its peak above `resident`: activations, gradients as backward makes them, temporaries


def profile_step(model, inputs, targets, state=None, holding=Holding()):
    """Measure one forward/backward of `model` (as configured: its activation checkpointing applies) on the
    NumPy arrays `inputs`, `targets` from the carried `state` (None: zeros), holding the gradients as the mode's
    `holding` does (held_gradients). It leaves no trace: the gradients, buffers and random generators are as
    before."""
    params = list(model.parameters())
    device = params[0].device if params else "cpu"
    saved_grads = [p.grad for p in params]
    try:
        for p in params:
            p.grad = None
        with preserved_buffers(model), fork_rng(get_rng_state()), \
                MemoryMeter(device, resident=_state_tensors(model)) as meter:
            x, y = (dt.tensor(a, device=device) for a in (inputs, targets))
            loss, _ = protocol.forward_loss(model, x, y, state)
            activations = meter.live_bytes - meter.start_bytes
            with held_gradients(params, holding):
                loss.backward()
        return StepProfile(meter.start_bytes, activations, meter.peak_bytes - meter.start_bytes)
    finally:
        for p, grad in zip(params, saved_grads):
            p.grad = grad


class held_gradients:
    """Context manager: while backward runs inside, the parameters' gradients are held as `holding` says. Kept
    (the default): nothing changes. Not kept (ZeRO stage 2): each gradient, once final, leaves a copy of its
    `holding.gradients` share (the slice a rank receives; counted by a running MemoryMeter) and is dropped, as
    the Reducer packs and drops it; with `holding.bucket_layout` its bucket's send rows are imitated too
    (_SendRows), else gradient_rows_bytes bounds them. The copies live until exit."""

    def __init__(self, params, holding):
        self.params, self.holding = [p for p in params if p.requires_grad], holding
        self.kept, self.handles, self.rows = [], [], None

    def __enter__(self):
        if not self.holding.gradients_kept:
            if self.holding.bucket_layout is not None:
                self.rows = _SendRows(self.params, self.holding)
            self.handles = [p.register_post_accumulate_grad_hook(self._drop) for p in self.params]
        return self

    def _drop(self, param):
        if self.rows is not None:
            self.rows.pack(param)
        flat = param.grad.data.reshape(-1)
        share = flat[:math.ceil(flat.size * self.holding.gradients)].copy()
        memory.count(share)
        self.kept.append(share)
        param.grad = None

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        self.handles, self.kept, self.rows = [], [], None
        return False


class _SendRows:
    """ZeRO stage 2's send rows as the Reducer keeps them, at their worst: a bucket's rows (its size) appear with
    its first gradient; full buckets start in bucket order, and starting one while `rows_buckets - 1` run first
    retires the oldest (the Reducer waits for it then); the rest live until backward ends."""

    def __init__(self, params, holding):
        self.buckets = holding.bucket_layout([(str(i), p) for i, p in enumerate(params)])
        self.bucket_of = {id(params[i]): k for k, members in enumerate(self.buckets) for i in members}
        self.sizes = [sum(params[i].numel() for i in members) for members in self.buckets]
        self.missing = [len(members) for members in self.buckets]
        self.rows = [None] * len(self.buckets)
        self.running, self.next = [], 0
        self.most_running = max(1, (holding.rows_buckets or len(self.buckets) + 1) - 1)

    def pack(self, param):
        k = self.bucket_of[id(param)]
        if self.rows[k] is None:
            self.rows[k] = param.backend.xp.empty(self.sizes[k], dtype=param.grad.data.dtype)
            memory.count(self.rows[k])
        self.missing[k] -= 1
        while self.next < len(self.buckets) and self.missing[self.next] == 0:
            while len(self.running) >= self.most_running:
                self.rows[self.running.pop(0)] = None
            self.running.append(self.next)
            self.next += 1


def gradient_rows_bytes(module, holding):
    """Bytes of the full-size gradient send rows a process of `holding` keeps alive at once (ZeRO stage 2: the
    rows of `rows_buckets` buckets, each at most bucket_bytes or one parameter; 0 where gradients are kept, or
    where held_gradients imitates the rows in the profile itself: holding.bucket_layout)."""
    if holding.gradients_kept or holding.bucket_layout is not None:
        return 0
    trained = [p for p in module.parameters() if p.requires_grad]
    everything = _distinct_bytes(trained)
    if holding.rows_buckets is None:
        return everything
    largest = max([holding.bucket_bytes] + [p.data.nbytes for p in trained])
    return min(everything, round(holding.rows_buckets * largest))


def predict(module, optimizer, profile, holding=Holding()):
    """The MemoryEstimate of a process training `module` (what it holds: a pipeline stage, or the model) with
    `optimizer`, from the `profile` of a micro-batch and the mode's `holding`."""
    resident = _distinct_bytes(_state_tensors(module))
    trained = _distinct_bytes(p for p in module.parameters() if p.requires_grad)
    gradients = round(trained * holding.gradients)
    state = sum((optimizer.state_buffers(group) or 0) * _distinct_bytes(group["params"])
                for group in optimizer.param_groups)
    state = round(state * holding.optimizer_state)
    if holding.step_bytes is not None:
        activations = holding.activation_bytes
        peak = resident + state + holding.step_bytes
    elif holding.activation_bytes is not None:
        activations = holding.activation_bytes
        peak = resident + state + gradients + activations
    else:
        activations = profile.activations
        if holding.gradient_buffers:
            held = gradients + profile.working
        elif not holding.gradients_kept:           # the profile held the kept shares (and the rows, imitated)
            held = profile.working + gradient_rows_bytes(module, holding)
        else:
            held = max(gradients, profile.working)
        peak = resident + state + held
    return MemoryEstimate(resident, gradients, state, activations, peak)


def write_memory_json(run_dir, estimate, measured_peak_bytes=None):
    """Write run_dir/memory.json atomically (a temporary file renamed over it): the estimate's fields."""
    path = Path(run_dir) / MEMORY_FILE
    write_atomically(path, (json.dumps(estimate.to_json(measured_peak_bytes), indent=1) + "\n").encode())
    return path


def _state_tensors(module):
    return list(module.state_dict(keep_vars=True).values())


def _distinct_bytes(tensors):
    """Bytes of the tensors' arrays, each array once (tied weights are one array)."""
    seen = {}
    for t in tensors:
        seen[id(t.data)] = t.data.nbytes
    return sum(seen.values())


def available_bytes():
    """Memory this machine can still give (MemAvailable of /proc/meminfo, else free physical pages)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_fits(spec, vocab_size, streams, processes=1, stages=1, available=None):
    """Raise JobSpecError when `processes` processes on this machine, each training on `streams` streams (as one
    of `stages` pipeline stages), would need more memory than is available (`available` bytes; default
    available_bytes()); returns the estimate otherwise."""
    need = estimate(spec, vocab_size, streams, stages)
    if need is None:
        return None
    available = available_bytes() if available is None else available
    total = need.total * processes
    if total <= available:
        return need
    each = f" on each of the {processes} processes on this machine" if processes > 1 else ""
    width = family_of(spec.model.kind).width(spec.model)
    raise JobSpecError(
        f"{spec.source or '<job>'}: the job needs about {format_bytes(total)} of memory, this machine has "
        f"{format_bytes(available)} available: {need.describe()}{each} ([model] {width}, "
        f"layers = {spec.model.layers}, vocabulary {vocab_size:,}; [data] batch_size = {spec.data.batch_size}, "
        f"bptt = {spec.data.bptt}); choose a smaller model or batch")


def format_bytes(n):
    """1536 -> "1.5 KiB"."""
    if n < 1024:
        return f"{n} B"
    exponent = min(int(math.log(n, 1024)), 5)
    return f"{n / 1024 ** exponent:.1f} {('KiB', 'MiB', 'GiB', 'TiB', 'PiB')[exponent - 1]}"
