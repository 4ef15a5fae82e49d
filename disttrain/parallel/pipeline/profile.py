"""Profile: what each block of the chain costs, measured on a sample input.

    prof = profile(model, tokens)           # or profile(blocks_of(model), tokens)
    print(prof.table())
    prof.costs()                            # per block: forward + backward seconds

Three passes over the chain, each block fed the previous block's output (detached, so each
block's backward stops at its own input, as it does at a stage boundary):
  1. memory: a MemoryMeter around each block's forward gives the bytes its graph keeps for
     backward plus its output (`activation_bytes`);
  2. ops: every Function.apply in the forward is timed and recorded with the block it ran in
     (an op observer, disttrain.autograd.observe);
  3. timing: `repeats` rounds of all forwards, then all backwards in reverse (a step's order:
     what each block finds in the caches is realistic); the median (or min) of each kept.
A block may return a tuple (or list) of Tensors: its bytes are theirs together, its shape theirs each, and
`one_tensor` is False (no stage may start after it: partition.cut_constraints).
NOTE: profiling leaves no trace in the model: gradients, buffers (running statistics, counters) and the random
generators are restored.
"""
import gc
import statistics
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field

from disttrain.autograd.observe import observe_ops
from disttrain.autograd.engine import backward
from disttrain.nn.module import Module
from disttrain.nn.utils import preserved_buffers
from disttrain.models.protocol import block_states, state_tensors
from disttrain.parallel.pipeline.blocks import Stage, blocks_of
from disttrain.tensor import dtypes
from disttrain.tensor.creation import ones_like
from disttrain.tensor.memory import MemoryMeter
from disttrain.tensor.random import fork_rng, get_rng_state
from disttrain.tensor.tensor import Tensor


@dataclass
class OpRecord:
    """One Function.apply of the forward: op class name, the block it ran in, seconds, output bytes."""

    op: str
    block: str
    forward_s: float
    output_bytes: int


@dataclass
class BlockRecord:
    """One block: median forward/backward seconds, bytes kept for backward (its output included),
    bytes of its parameters, and the output that crosses a cut placed after it (output_shape: a tuple of
    shapes, one_tensor False, when the block returns several Tensors)."""

    name: str
    forward_s: float
    backward_s: float
    activation_bytes: int
    param_bytes: int
    output_bytes: int
    output_shape: tuple
    ops: int
    one_tensor: bool = True

    @property
    def cost_s(self):
        return self.forward_s + self.backward_s


@dataclass
class Profile:
    blocks: list
    ops: list = field(default_factory=list)
    repeats: int = 0
    statistic: str = "median"
    clock: str = "wall"

    def costs(self):
        """Per block: forward + backward seconds."""
        return [b.cost_s for b in self.blocks]

    def output_bytes(self):
        return [b.output_bytes for b in self.blocks]

    def table(self, top_ops=8):
        """The blocks, then the op types that took the most forward time."""
        rows = [(b.name, _ms(b.forward_s), _ms(b.backward_s), _ms(b.cost_s), _mb(b.activation_bytes),
                 _mb(b.param_bytes), _mb(b.output_bytes), str(b.output_shape), str(b.ops)) for b in self.blocks]
        total = sum(self.costs()) or 1.0
        rows.append(("total", _ms(sum(b.forward_s for b in self.blocks)), _ms(sum(b.backward_s for b in self.blocks)),
                     _ms(total), _mb(sum(b.activation_bytes for b in self.blocks)),
                     _mb(sum(b.param_bytes for b in self.blocks)), "", "", str(len(self.ops))))
        out = [format_table(("block", "fwd ms", "bwd ms", "cost ms", "act MB", "param MB", "out MB", "out shape",
                             "ops"), rows)]
        by_op = defaultdict(lambda: [0, 0.0, 0])
        for r in self.ops:
            entry = by_op[r.op]
            entry[0] += 1
            entry[1] += r.forward_s
            entry[2] += r.output_bytes
        top = sorted(by_op.items(), key=lambda kv: -kv[1][1])[:top_ops]
        out.append(format_table(("op", "calls", "fwd ms", "out MB"),
                                [(op, str(n), _ms(s), _mb(b)) for op, (n, s, b) in top]))
        return "\n\n".join(out)


_STATISTICS = {"median": statistics.median, "min": min}
_CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def profile(model, sample_input, sample_state=None, repeats=5, loss_fn=None, statistic="median", clock="wall"):
    """Measure every block of `model` (a Module, or blocks_of(model)'s list) on `sample_input`.

    sample_state: the model's own state (what model.forward takes), split among its blocks (given the
    blocks' list instead of a model: one state per block, or None).
    loss_fn(y) -> scalar, if given, is applied to the last block's output inside its timed
    forward and drives its backward (the last stage computes the loss); otherwise each block's
    backward is seeded with the gradient the next block sent back. statistic: how the repeats'
    times are summarised, "median" or "min" (steadier where other processes share the cores:
    interference only ever adds time). clock: "wall" (device work waited for), or "cpu" (this
    process's CPU time: what the blocks cost a rank with a core of its own, even where more
    processes than cores run; only for single-threaded CPU work, threads' times add up).
    """
    if repeats < 1:
        raise ValueError(f"profile: repeats must be >= 1, got {repeats}")
    if statistic not in _STATISTICS:
        raise ValueError(f"profile: statistic must be one of {sorted(_STATISTICS)}, got {statistic!r}")
    if clock not in _CLOCKS:
        raise ValueError(f"profile: clock must be one of {sorted(_CLOCKS)}, got {clock!r}")
    summary, now = _STATISTICS[statistic], _CLOCKS[clock]
    if isinstance(model, Module):
        blocks = blocks_of(model)
        states = block_states(model, blocks, sample_state)
    else:
        blocks = list(model)
        states = list(sample_state) if sample_state is not None else [None] * len(blocks)
    params = [p for _, b in blocks for p in b.parameters()]
    with preserved_buffers(Stage(blocks)), fork_rng(get_rng_state()), _grads_kept(params):
        activation = _measure_memory(blocks, sample_input, states, loss_fn)
        ops, outputs = _record_ops(blocks, sample_input, states, loss_fn)  # (shape, bytes) per block
        with _gc_paused():  # as timeit does: a collection inside one block's timing is not its cost
            times = [_time_chain(blocks, sample_input, states, loss_fn, now) for _ in range(repeats)]
    records = []
    for i, (name, block) in enumerate(blocks):
        shape, nbytes, one = outputs[i]
        records.append(BlockRecord(
            name=name, forward_s=summary([t[i][0] for t in times]),
            backward_s=summary([t[i][1] for t in times]), activation_bytes=activation[i],
            param_bytes=sum(p.data.nbytes for p in block.parameters()), output_bytes=nbytes,
            output_shape=shape, ops=sum(1 for r in ops if r.block == name), one_tensor=one))
    return Profile(records, ops, repeats, statistic, clock)


# ---- the three passes ----------------------------------------------------------------------------
def _measure_memory(blocks, x, states, loss_fn):
    """Per block: bytes alive after its forward (graph + output) that were not alive before."""
    kept = []
    device = x.device if isinstance(x, Tensor) else "cpu"
    with MemoryMeter(device) as meter:  # one meter, reset per block: starting one scans every object
        for i, (_, block) in enumerate(blocks):
            x = _block_input(x, i)
            meter.reset()
            y, _ = block(x, states[i])
            if loss_fn is not None and i == len(blocks) - 1:
                y = loss_fn(y)
            kept.append(max(0, meter.live_bytes - meter.start_bytes))
            x = y
            del y  # else this graph would be freed inside the next block's measurement
    return kept


def _record_ops(blocks, x, states, loss_fn):
    """One forward with every op recorded (the loss's with the last block's); returns the records and
    each block's output (shape, bytes, whether it is one Tensor)."""
    records, outputs, where = [], [], [None]

    def on_op(call):  # ops inside another op's forward (a checkpoint's first run) count toward that op
        if call.depth == 0:
            records.append(OpRecord(call.op.__name__, where[0], call.seconds,
                                    sum(t.data.nbytes for t in call.outputs)))

    with observe_ops(on_op):
        for i, (name, block) in enumerate(blocks):
            where[0] = name
            x, _ = block(_block_input(x, i), states[i])
            tensors = state_tensors(x)
            shapes = [tuple(t.shape) for t in tensors]
            one = isinstance(x, Tensor)
            outputs.append((shapes[0] if one else tuple(shapes), sum(t.data.nbytes for t in tensors), one))
        if loss_fn is not None:
            loss_fn(x)
    return records, outputs


def _time_chain(blocks, x, states, loss_fn, now):
    """One round as a training step runs it: every forward in order, then every backward in
    reverse, block i's seeded with the gradient block i+1 sent back to its input (so caches and
    gradient values are those of a real step). Returns (forward s, backward s) per block."""
    n = len(blocks)
    inputs, outputs, forward_s = [], [], []
    for i, (_, block) in enumerate(blocks):
        x = _block_input(x, i)
        start = _synced(x, now)
        y, _ = block(x, states[i])
        if loss_fn is not None and i == n - 1:
            y = loss_fn(y)
        forward_s.append(_synced(y, now) - start)
        inputs.append(x)
        outputs.append(y)
        x = y
    del x, y
    for _, block in blocks:  # fresh gradients, as after zero_grad
        for p in block.parameters():
            p.grad = None
    backward_s = [0.0] * n
    for i in reversed(range(n)):
        out, outputs[i] = outputs[i], None  # freed once its backward ran, as in a real step
        roots, seeds = _backward_roots(out, inputs[i + 1] if i < n - 1 else None)
        if not roots:
            continue
        start = _synced(roots[0], now)
        backward(roots, seeds)
        backward_s[i] = _synced(roots[0], now) - start
    return list(zip(forward_s, backward_s))


def _backward_roots(out, next_input):
    """(tensors, seeds) a block's backward starts from: each output Tensor that requires grad, seeded with the
    gradient the next block sent back to it (next_input: that block's input, the same nest), else with ones
    (None for a scalar: the loss)."""
    outs = state_tensors(out)
    sent = state_tensors(next_input) if next_input is not None else [None] * len(outs)
    roots, seeds = [], []
    for t, received in zip(outs, sent):
        if t.requires_grad:
            seed = received.grad if received is not None else None
            roots.append(t)
            seeds.append(seed if seed is not None or not t.ndim else ones_like(t))
    return roots, seeds


def _block_input(x, i):
    """Block i's input: the sample for block 0; else the previous output (each Tensor of a tuple or list),
    detached and, when it is floating point, requiring grad (a stage computes its input's gradient to send
    it back)."""
    if i == 0:
        return x
    if isinstance(x, (tuple, list)):
        return type(x)(_block_input(item, i) for item in x)
    if not isinstance(x, Tensor):
        return x
    x = x.detach()
    return x.requires_grad_() if dtypes.is_floating(x.dtype) else x


def _synced(t, now):
    sync = getattr(t.backend, "synchronize", None) if isinstance(t, Tensor) else None
    if sync is not None:  # device work is asynchronous: wait for it before reading the clock
        sync()
    return now()


@contextmanager
def _gc_paused():
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


@contextmanager
def _grads_kept(params):
    """Restore every parameter's .grad on exit: the timed backwards accumulate into them."""
    saved = [p.grad for p in params]
    try:
        yield
    finally:
        for p, g in zip(params, saved):
            p.grad = g


# ---- printing ------------------------------------------------------------------------------------
def format_table(header, rows):
    """Left-aligned first column, right-aligned others, columns as wide as their widest cell."""
    rows = [tuple(header)] + [tuple(r) for r in rows]
    widths = [max(len(r[c]) for r in rows) for c in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if c == 0 else cell.rjust(w) for c, (cell, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def _ms(seconds):
    return f"{seconds * 1e3:.3f}"


def _mb(nbytes):
    return f"{nbytes / 2**20:.3f}"
