"""How much memory a training run needs, estimated from the job alone, before anything is allocated.

    need = estimate(spec, vocab_size, streams=spec.data.batch_size)
    need.parameters, need.gradients, need.optimizer, need.activations, need.total      # bytes, one process
    check_fits(spec, vocab_size, streams=10, processes=2)    # JobSpecError when the machine cannot hold it

What is counted, for the LSTM language model in float32 (4 bytes a number):
- parameters: exactly, from [model] (embedding V x E; per layer 4H x (in + H) weights and two 4H biases;
  decoder H x V + V, its weight shared with the embedding when tied);
- gradients: one array per parameter; optimizer state: none for plain SGD, one buffer with momentum, two
  for Adam and AdamW;
- activations of one training step on `streams` streams of `bptt` tokens, what backward keeps plus the
  largest temporaries: per time step and stream the embedding (E), per layer the input, gates and cell
  states (in + 8H, and H for a dropout mask), and the logits and their gradient (2V).
  Sequence checkpointing ([memory] activation_checkpointing) keeps the last segment of T/S steps and one
  recomputed in backward, plus the S carried states.
- a pipeline stage (one of `stages`): the whole model's parameters (every rank builds the whole model before
  keeping its stage) and a stage's share of the rest.

It is an estimate, meant to refuse a job that cannot fit (a hidden size of 100,000 needs terabytes) before
NumPy fails mid-allocation, not to budget tightly: tests/train/test_memory_plan.py checks it against the
parameters a model has and the bytes the memory meter sees a step allocate. A finer planner (per-op
activations, pipeline stages, device memory) can grow from `estimate`.
"""
import math
import os
from dataclasses import dataclass

from disttrain.checkpointing.plan import segment_bounds
from disttrain.train.jobspec import JobSpecError

__all__ = ["MemoryEstimate", "estimate", "parameter_count", "available_bytes", "check_fits", "format_bytes"]

FLOAT_BYTES = 4
OPTIMIZER_BUFFERS = {"sgd": 0, "adam": 2, "adamw": 2}


@dataclass(frozen=True)
class MemoryEstimate:
    parameters: int       # bytes
    gradients: int
    optimizer: int
    activations: int

    @property
    def total(self):
        return self.parameters + self.gradients + self.optimizer + self.activations

    def describe(self):
        return (f"parameters {format_bytes(self.parameters)}, gradients {format_bytes(self.gradients)}, optimizer "
                f"state {format_bytes(self.optimizer)}, activations {format_bytes(self.activations)}")


def parameter_count(spec, vocab_size):
    """The number of parameters of the job's model (exact for [model] kind = "lstm_lm")."""
    m = spec.model
    hidden, embed, layers = m.hidden, m.embed, m.layers
    lstm = sum(4 * hidden * ((embed if k == 0 else hidden) + hidden) + 8 * hidden for k in range(layers))
    decoder = hidden * vocab_size + vocab_size
    tied = hidden * vocab_size if m.tie_weights else 0
    return vocab_size * embed + lstm + decoder - tied


def estimate(spec, vocab_size, streams, stages=1):
    """The MemoryEstimate of one process training the job on `streams` streams of each batch (as one of
    `stages` pipeline stages)."""
    params = parameter_count(spec, vocab_size) * FLOAT_BYTES
    buffers = OPTIMIZER_BUFFERS[spec.optim.kind] + (1 if spec.optim.kind == "sgd" and spec.optim.momentum else 0)
    share = lambda n: -(-n // stages)          # noqa: E731
    return MemoryEstimate(params, share(params), share(buffers * params),
                          share(_activation_bytes(spec, vocab_size, streams)))


def _activation_bytes(spec, vocab_size, streams):
    m, steps = spec.model, spec.data.bptt
    per_step = m.embed + 2 * vocab_size + sum((m.embed if k == 0 else m.hidden) + 9 * m.hidden
                                              for k in range(m.layers))
    segments = spec.memory.activation_checkpointing
    if segments in ("none", "auto"):           # "auto" keeps at most what "none" keeps
        kept_steps, carried = steps, 0
    else:
        bounds = segment_bounds(steps, segments)
        kept_steps = 2 * max(b - a for a, b in zip(bounds, bounds[1:]))     # the last segment + one recomputed
        carried = (len(bounds) - 1) * m.layers * 2 * m.hidden
    return (kept_steps * per_step + carried) * streams * FLOAT_BYTES


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
    available = available_bytes() if available is None else available
    total = need.total * processes
    if total <= available:
        return need
    each = f" on each of the {processes} processes on this machine" if processes > 1 else ""
    raise JobSpecError(
        f"{spec.source or '<job>'}: the job needs about {format_bytes(total)} of memory, this machine has "
        f"{format_bytes(available)} available: {need.describe()}{each} ([model] hidden = {spec.model.hidden}, "
        f"layers = {spec.model.layers}, vocabulary {vocab_size:,}; [data] batch_size = {spec.data.batch_size}, "
        f"bptt = {spec.data.bptt}); choose a smaller model or batch")


def format_bytes(n):
    """1536 -> "1.5 KiB"."""
    if n < 1024:
        return f"{n} B"
    exponent = min(int(math.log(n, 1024)), 5)
    return f"{n / 1024 ** exponent:.1f} {('KiB', 'MiB', 'GiB', 'TiB', 'PiB')[exponent - 1]}"
