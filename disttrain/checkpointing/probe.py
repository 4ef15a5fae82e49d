"""ChainProbe: what each item of a model's chain costs in memory and time, measured in one real step.

    with ChainProbe(resident=tensors_alive_at_the_start) as probe:
        loss, _ = model.forward_loss(x, y)      # the model runs its chain through run_chain
        loss.backward()
    costs = probe.costs()                     # disttrain.checkpointing.planner.StepCosts

While a probe is active, the outermost chain that run_chain runs is watched: at every boundary of its plan
the probe notes the live and peak array bytes (a MemoryMeter) and the time, and it passes the boundary's
tensors (the carry and the pieces' outputs) through a marker node, an identity op whose backward notes the
same when backward reaches that boundary. Between marks lie the phases of the step the planner's timeline
is made of: before the chain, each item's forward, the loss, each item's backward, and the rest. Measure
with a plan that keeps every item as its own call (the planner's items), e.g. Plan.kept(bounds).

Chains inside an item (a Sequential in a block) and chains run after the first (a model with two) are not
watched; `chains` counts the outermost chains seen.
"""
import time

from disttrain.autograd.function import Function
from disttrain.checkpointing.plan import add_chain_watcher
from disttrain.checkpointing.planner import ItemCost, StepCosts
from disttrain.tensor import dtypes
from disttrain.tensor.memory import MemoryMeter
from disttrain.tensor.tensor import Tensor

__all__ = ["ChainProbe"]


class ChainProbe:
    """Context manager: marks of one step's chain. device: "cpu" or "cuda"; resident: the tensors alive at the
    start that the step may use (MemoryMeter's)."""

    def __init__(self, device="cpu", resident=None):
        self.meter = MemoryMeter(device, resident=resident)
        self.forward_marks, self.backward_marks = [], {}      # boundary k -> (live, peak before, seconds)
        self.outs, self.bounds = [], []
        self.chains = 0
        self.parameters = ()          # run_chain's `parameters` of the watched chain
        self._watching = False
        self.end = None

    def __enter__(self):
        self.meter.start()
        self._origin, self._clock = self.meter.start_bytes, time.perf_counter()
        self._handle = add_chain_watcher(self._watch)
        return self

    def __exit__(self, *exc):
        self.end = self._mark()
        self._handle.remove()
        self.meter.stop()
        return False

    def _mark(self):
        """(live bytes, peak bytes since the last mark, seconds since it), bytes relative to the probe's start;
        starts the next phase."""
        now = time.perf_counter()
        mark = (self.meter.live_bytes - self._origin, self.meter.peak_bytes - self._origin, now - self._clock)
        self.meter.reset()
        self._clock = now
        return mark

    def _watch(self, plan, parameters):
        """The watch of the first outermost chain of the step; None for chains inside it and after it."""
        if self._watching:
            return None
        self.chains += 1
        if self.chains > 1:
            return None
        self.parameters = parameters
        return _Watch(self)

    def _grad_bytes(self, start, stop):
        """Bytes of the gradients of the parameters that items [start, stop) alone use (a function of run_chain's
        `parameters`); those of a list (every item's) are the chain's shared ones."""
        if not callable(self.parameters):
            return 0
        return _nbytes(self.parameters(start, stop))

    # ---- run_chain's calls ------------------------------------------------------------------------------------
    def backward_mark(self, boundary):
        self.backward_marks[boundary] = self._mark()

    def costs(self, unit="items"):
        """The StepCosts of the watched chain (ValueError when the step ran none)."""
        if not self.forward_marks:
            raise ValueError("ChainProbe: the step ran no chain through run_chain (no checkpoint_segments plan)")
        f, b, n = self.forward_marks, self.backward_marks, len(self.forward_marks) - 1
        backward_end = [b.get(k) for k in range(n + 1)]
        items = []
        for i in range(n):
            start_bwd = backward_end[i + 1]
            stop_bwd = backward_end[i] if backward_end[i] is not None else self.end
            items.append(ItemCost(keep=f[i + 1][0] - f[i][0], forward_peak=f[i + 1][1] - f[i][0],
                                  backward_peak=stop_bwd[1] - start_bwd[0], backward_change=stop_bwd[0] - start_bwd[0],
                                  out=self.outs[i], seconds=f[i + 1][2],
                                  grads=self._grad_bytes(self.bounds[i], self.bounds[i + 1])))
        tail = self.end[1] - backward_end[0][0] if backward_end[0] is not None else 0
        return StepCosts(tuple(items), before_peak=f[0][1], before_keep=f[0][0], after_peak=b[n][1] - f[n][0],
                         after_change=b[n][0] - f[n][0], tail_peak=max(0, tail), bounds=tuple(self.bounds), unit=unit,
                         shared_grads=0 if callable(self.parameters) else _nbytes(self.parameters))


class _Watch:
    def __init__(self, probe):
        self.probe = probe
        probe._watching = True
        self.boundary = 0

    def before(self, segment, carry):
        """At the start of the chain's segment: marks the boundary; the carry passes through its marker."""
        if self.boundary == 0:
            self.probe.forward_marks.append(self.probe._mark())
            self.probe.bounds.append(segment.start)
            carry = _marked(carry, self.probe, 0)
        return carry

    def after(self, segment, carry, outputs):
        """At the end of the segment: marks the boundary; the carry and the segment's outputs pass through its
        marker. Returns them."""
        self.boundary += 1
        probe = self.probe
        probe.forward_marks.append(probe._mark())
        probe.bounds.append(segment.stop)
        probe.outs.append(sum(t.data.nbytes for t in (*carry, *outputs) if isinstance(t, Tensor)))
        both = _marked((*carry, *outputs), probe, self.boundary)
        return both[:len(carry)], list(both[len(carry):])

    def chain_end(self):
        self.probe._watching = False


def _nbytes(tensors):
    return sum(t.data.nbytes for t in tensors if t.requires_grad)


def _marked(values, probe, boundary):
    """`values` with its floating-point tensors that require grad replaced by a marker node's outputs."""
    values = tuple(values)
    where = [i for i, v in enumerate(values) if isinstance(v, Tensor) and v.requires_grad
             and dtypes.is_floating(v.dtype)]
    if not where:
        return values
    marked = _Mark.apply(*[values[i] for i in where], probe=probe, boundary=boundary)
    marked = marked if isinstance(marked, tuple) else (marked,)
    out = list(values)
    for i, m in zip(where, marked):
        out[i] = m
    return tuple(out)


class _Mark(Function):
    """Identity on its inputs (the same arrays: no memory); its backward notes the boundary and passes the
    gradients on."""

    same_dtype = False

    def forward(self, *arrays, probe, boundary):
        self.probe, self.boundary = probe, boundary
        self.n_outputs = len(arrays)
        return arrays if len(arrays) > 1 else arrays[0]

    def backward(self, *grads):
        self.probe.backward_mark(self.boundary)
        return grads
