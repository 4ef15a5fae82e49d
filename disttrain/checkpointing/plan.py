"""Segment plans: which pieces of a chain to keep and which to recompute, and the one runner of them.

A chain is a sequence of n items run in order, each from the carry the previous one left: the blocks of
a Sequential or a Transformer (carry: the activation), the time steps of a recurrence (carry: the state).
A Plan cuts [0, n) into Segments. A kept segment is one call of the chain's `run`, every activation
kept for backward. A recomputed segment runs as one checkpoint node (disttrain.checkpointing.checkpoint):
its first run keeps only its output carry, and backward reruns it, following its `inner` plan, which may
itself recompute: nested checkpoints (binomial checkpointing over time steps is such a tree).

    plan = plan_for(n, setting)        # setting: None/"none", "sqrt", a segment count, a Plan or a policy
    outputs, carry = run_chain(plan, run, carry, parameters=...)

The settings (a model's `checkpoint_segments`, a job's [memory] activation_checkpointing):
    None / "none"   one kept segment: no checkpointing
    "sqrt", k       round(sqrt(n)) or k nearly equal segments, every one but the last recomputed (Chen et al.
                    2016; the last one's activations are needed at once by backward)
    Plan            an explicit plan, e.g. the budget planner's (disttrain.checkpointing.planner); rescaled
                    when the chain's length differs from the plan's (a shorter last TBPTT window)
    a policy        an object whose plan(n) returns the Plan for a chain of n items
"""
import math
from dataclasses import dataclass, field

from disttrain.autograd import grad_mode
from disttrain.autograd.hooks import RemovableHandle
from disttrain.checkpointing.checkpoint import checkpoint_with_leaves, parameters_of

__all__ = ["Segment", "Plan", "plan_for", "segment_bounds", "check_setting", "SegmentsSetting", "run_chain",
           "checkpoint_sequential", "add_chain_watcher", "binomial_plan", "binomial_reach"]


@dataclass(frozen=True)
class Segment:
    """Items [start, stop) of a chain: kept (one call of run), or recomputed following `inner` (a tuple of
    Segments covering [start, stop); empty: one kept call)."""
    start: int
    stop: int
    recompute: bool = False
    inner: tuple = ()

    def __post_init__(self):
        if not 0 <= self.start < self.stop:
            raise ValueError(f"Segment: expected 0 <= start < stop, got [{self.start}, {self.stop})")
        if self.inner and not self.recompute:
            raise ValueError(f"Segment [{self.start}, {self.stop}): only a recomputed segment has an inner plan")
        _check_cover(self.inner, self.start, self.stop)

    @property
    def pieces(self):
        """What a recomputation of this segment runs: its inner plan, or the whole segment as one kept call."""
        return self.inner or (Segment(self.start, self.stop),)

    def to_dict(self):
        out = {"start": self.start, "stop": self.stop, "recompute": self.recompute}
        if self.inner:
            out["inner"] = [s.to_dict() for s in self.inner]
        return out

    @classmethod
    def from_dict(cls, d):
        return cls(d["start"], d["stop"], d["recompute"], tuple(cls.from_dict(s) for s in d.get("inner", ())))


@dataclass(frozen=True)
class Plan:
    """Segments covering the n items of a chain in order; `label` says where the plan came from."""
    segments: tuple
    n: int
    label: str = field(default="plan", compare=False)

    def __post_init__(self):
        _check_cover(self.segments, 0, self.n)
        if not self.segments:
            raise ValueError(f"Plan: no segments for a chain of {self.n} items")

    @classmethod
    def kept(cls, bounds, label="kept"):
        """Every piece [bounds[i], bounds[i+1]) its own kept call."""
        return cls(tuple(Segment(a, b) for a, b in zip(bounds, bounds[1:])), bounds[-1], label)

    def for_length(self, n):
        """This plan for a chain of n items: itself, or its bounds scaled to n (pieces that vanish merge)."""
        if n == self.n:
            return self
        return Plan(_rescaled(self.segments, lambda b: b * n // self.n), n, self.label)

    def leaves(self):
        """The kept calls of a step in the order backward meets them in a recomputation or the first run."""
        return [leaf for s in self.segments for leaf in _leaves(s)]

    def recomputed_items(self):
        """Items run again in backward, counted once per rerun (nested segments rerun more than once)."""
        return sum(_reruns(s) for s in self.segments)

    def depth(self):
        """Nesting depth of recomputation: 0 none, 1 one level (sqrt, the budget planner's chains), more: nested."""
        return max(_depth(s) for s in self.segments)

    def describe(self, unit="items"):
        """One line: what is recomputed."""
        recomputed = [s for s in self.segments if s.recompute]
        if not recomputed:
            return f"{self.label}: nothing recomputed ({self.n} {unit} kept)"
        ranges = _ranges(recomputed)
        nested = f", nested {self.depth()} deep" if self.depth() > 1 else ""
        return (f"{self.label}: recompute {unit} {ranges} ({len(recomputed)} segment"
                f"{'s' if len(recomputed) > 1 else ''}{nested}; {self.recomputed_items()} of {self.n} {unit} rerun "
                f"in backward)")

    def to_dict(self):
        return {"label": self.label, "n": self.n, "segments": [s.to_dict() for s in self.segments]}

    @classmethod
    def from_dict(cls, d):
        return cls(tuple(Segment.from_dict(s) for s in d["segments"]), d["n"], d.get("label", "plan"))


def segment_bounds(n, segments):
    """Boundaries [0, ..., n] cutting n items into `segments` ("sqrt" or an int) nearly equal runs."""
    if segments == "sqrt":
        segments = max(1, round(math.sqrt(n)))
    elif isinstance(segments, bool) or not isinstance(segments, int) or segments < 1:
        raise ValueError(f"segments must be a positive int or 'sqrt', got {segments!r}")
    segments = min(segments, max(n, 1))
    return [i * n // segments for i in range(segments + 1)]


def check_setting(setting):
    """Raise ValueError unless `setting` is None, "sqrt", a positive int, a Plan or a policy (has plan(n))."""
    if setting is None or isinstance(setting, Plan) or callable(getattr(setting, "plan", None)):
        return setting
    segment_bounds(1, setting)
    return setting


def plan_for(n, setting):
    """The Plan a setting (see the module docstring) gives a chain of n >= 1 items."""
    if setting is None or setting == "none":
        return Plan((Segment(0, n),), n, "none")
    if isinstance(setting, Plan):
        return setting.for_length(n)
    if callable(getattr(setting, "plan", None)):
        return setting.plan(n)
    bounds = segment_bounds(n, setting)
    last = len(bounds) - 2
    return Plan(tuple(Segment(a, b, recompute=i < last) for i, (a, b) in enumerate(zip(bounds, bounds[1:]))), n,
                str(setting))


class SegmentsSetting:
    """A model's `checkpoint_segments` attribute: a setting of plan_for (None, "sqrt", an int, a Plan, a
    policy), checked when assigned."""

    def __set_name__(self, owner, name):
        self.slot = "_" + name

    def __get__(self, obj, owner=None):
        return self if obj is None else obj.__dict__.get(self.slot)

    def __set__(self, obj, segments):
        obj.__dict__[self.slot] = check_setting(segments)


def checkpoint_sequential(modules, segments, input, preserve_rng_state=True):
    """Run `modules` (a Sequential or a list of callables) on `input` as checkpointed pieces.

    segments: a setting of disttrain.checkpointing.plan.plan_for over the modules: an int, "sqrt" for
    round(sqrt(len(modules))) nearly equal segments, every one but the last checkpointed (the last one's
    activations are needed at once by backward, as in torch.utils.checkpoint), or a Plan.
    """
    modules = list(modules)

    def run(start, stop, carry, items):
        x = carry[0]
        for m in modules[start:stop]:
            x = m(x)
        return None, (x,)

    def parameters(start, stop):
        return [p for m in modules[start:stop] for p in parameters_of(m)[0]]

    _, (x,) = run_chain(plan_for(len(modules), segments), run, (input,), parameters=parameters,
                        preserve_rng_state=preserve_rng_state)
    return x


# ---- running a plan ----------------------------------------------------------------------------------------
def run_chain(plan, run, carry, item_inputs=(), parameters=(), preserve_rng_state=True):
    """Run the chain's items under `plan` -> (outputs of the kept calls in order, the final carry).

    run(start, stop, carry, items) -> (output or None, carry): items [start, stop) from `carry` (a tuple of
        tensors or None), `items` their own inputs (item_inputs[start:stop]). It is called again in backward
        for the recomputed segments, on detached copies of the carry and items.
    item_inputs: one tensor per item that the items read (a recurrence's x_t), passed through the checkpoint
        nodes so that their gradients flow.
    parameters: the tensors the items use besides these (a Module's parameters), or a function
        (start, stop) -> those of items [start, stop): inputs of each checkpoint node, so their gradients come
        back through the outer backward once (data parallelism's hooks fire once per parameter).
    Under no_grad every segment is a plain call. A chain watcher (add_chain_watcher: the memory probe) may
    be told of the top-level segments' boundaries.
    """
    carry = tuple(carry)
    items = _Items(tuple(item_inputs), 0)
    outputs = []
    watch = _watchers[-1](plan, parameters) if _watchers else None
    for segment in plan.segments:
        if watch is None:
            carry = _run_segment(segment, run, carry, items, parameters, preserve_rng_state, outputs)
            continue
        carry, done = watch.before(segment, carry), len(outputs)
        carry = _run_segment(segment, run, carry, items, parameters, preserve_rng_state, outputs)
        carry, outputs[done:] = watch.after(segment, carry, outputs[done:])
    if watch is not None:
        watch.chain_end()
    return outputs, carry


_watchers = []          # functions (plan, parameters) -> a watch (before, after, chain_end) or None


def add_chain_watcher(watcher):
    """Call watcher(plan, parameters) (run_chain's arguments) whenever run_chain starts; a watch it returns sees
    the chain's top-level segments:
    carry = watch.before(segment, carry), (carry, outputs) = watch.after(segment, carry, outputs) (it may pass
    them through ops of its own), watch.chain_end(). Returns a handle with remove()."""
    _watchers.append(watcher)
    return RemovableHandle(_watchers, watcher)


def _run_segment(segment, run, carry, items, parameters, preserve, outputs):
    if segment.recompute and grad_mode.state.enabled:
        return _run_recomputed(segment, run, carry, items, parameters, preserve, outputs)
    if segment.inner:
        # under no_grad (a checkpoint's first run) a nested segment still makes its rerun's calls: the checkpoint's
        # outputs are matched with the rerun's by position, so both runs must return the same outputs
        for inner in segment.inner:
            carry = _run_segment(inner, run, carry, items, parameters, preserve, outputs)
        return carry
    output, carry = run(segment.start, segment.stop, carry, items[segment.start:segment.stop])
    if output is not None:
        outputs.append(output)
    return carry


def _run_recomputed(segment, run, carry, items, parameters, preserve, outputs):
    """One checkpoint node for the segment; its function runs the segment's pieces (nested ones recompute)."""
    width, start, stop = len(carry), segment.start, segment.stop

    def piece(*args):
        local, state = [], args[:width]
        mine = _Items(args[width:], start)           # the (possibly detached) copies this call received
        for inner in segment.pieces:
            state = _run_segment(inner, run, state, mine, parameters, preserve, local)
        return (*state, *local)

    piece.__name__ = f"items {start}..{stop - 1}"
    leaves = parameters(start, stop) if callable(parameters) else parameters
    result = checkpoint_with_leaves(piece, (*carry, *items[start:stop]), list(leaves), False, preserve)
    outputs.extend(result[width:])
    return tuple(result[:width])


class _Items:
    """A chain's per-item inputs, indexed by item number from `offset`."""

    def __init__(self, tensors, offset):
        self.tensors, self.offset = tensors, offset

    def __getitem__(self, where):
        if not self.tensors:
            return ()
        return self.tensors[where.start - self.offset:where.stop - self.offset]


# ---- binomial checkpointing over time steps (Griewank & Walther's revolve as nested checkpoints) -------------
def binomial_reach(snapshots, repetitions):
    """The most items a nested plan with `snapshots` carries held at once and every item run at most
    1 + repetitions times forward can reverse: C(snapshots + repetitions, snapshots)."""
    return math.comb(snapshots + repetitions, snapshots)


def binomial_plan(n, snapshots, repetitions=None):
    """A nested plan for n items keeping at most `snapshots` carries of recomputed segments at once
    (besides the chain's input) and single-item kept calls, every item run at most 1 + repetitions times
    (default: the fewest that reach n): memory O(snapshots), extra time about repetitions x n forward items.

    The recursion of revolve: the first m items are one recomputed segment whose rerun follows the plan with
    one repetition less; its output carry is held while the other n - m items follow the plan with one
    snapshot less. m is the fewest items that leave the rest within reach.
    """
    if isinstance(snapshots, bool) or not isinstance(snapshots, int) or snapshots < 0:
        raise ValueError(f"binomial_plan: snapshots must be an int >= 0, got {snapshots!r}")
    if repetitions is None:
        repetitions = 0
        while binomial_reach(snapshots, repetitions) < n:
            if snapshots == 0:
                raise ValueError(f"binomial_plan: {n} items need at least one snapshot")
            repetitions += 1
    if binomial_reach(snapshots, repetitions) < n:
        raise ValueError(f"binomial_plan: {snapshots} snapshots and {repetitions} repetitions reach "
                         f"{binomial_reach(snapshots, repetitions)} items, not {n}")
    segments = _binomial(0, n, snapshots, repetitions)
    return Plan(segments, n, f"binomial ({snapshots} snapshots, {repetitions} repetitions)")


def _binomial(start, stop, snapshots, repetitions):
    out = []
    while stop - start > 1:
        first = max(1, stop - start - binomial_reach(snapshots - 1, repetitions))
        out.append(Segment(start, start + first, True, _binomial(start, start + first, snapshots, repetitions - 1)))
        start, snapshots = start + first, snapshots - 1
    return tuple(out) + (Segment(start, stop),)


# ---- helpers ---------------------------------------------------------------------------------------------------
def _check_cover(segments, start, stop):
    at = start
    for s in segments:
        if not isinstance(s, Segment) or s.start != at:
            raise ValueError(f"segments must cover [{start}, {stop}) in order without gaps, got "
                             f"{[(x.start, x.stop) if isinstance(x, Segment) else x for x in segments]}")
        at = s.stop
    if segments and at != stop:
        raise ValueError(f"segments cover [{start}, {at}), expected [{start}, {stop})")


def _rescaled(segments, scale):
    """The segments with every bound b moved to scale(b) (monotone, ends fixed); empty ones dropped."""
    out = []
    for s in segments:
        a, b = scale(s.start), scale(s.stop)
        if a < b:
            out.append(Segment(a, b, s.recompute, _rescaled(s.inner, scale) if s.inner else ()))
    return tuple(out)


def _leaves(segment):
    if not segment.recompute:
        return [segment]
    return [leaf for s in segment.pieces for leaf in _leaves(s)]


def _reruns(segment):
    if not segment.recompute:
        return 0
    return (segment.stop - segment.start) + sum(_reruns(s) for s in segment.inner)


def _depth(segment):
    if not segment.recompute:
        return 0
    return 1 + max((_depth(s) for s in segment.inner), default=0)


def _ranges(segments):
    """"0-9, 20-29" of segments' item ranges, adjacent ones joined."""
    spans = []
    for s in segments:
        if spans and spans[-1][1] == s.start:
            spans[-1][1] = s.stop
        else:
            spans.append([s.start, s.stop])
    text = [f"{a}-{b - 1}" if b - a > 1 else f"{a}" for a, b in spans]
    return ", ".join(text[:6]) + (f", ... ({len(text)} ranges)" if len(text) > 6 else "")
