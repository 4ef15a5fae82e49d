"""Activation checkpointing: trade one extra forward for O(sqrt(N)) activation memory.

Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost". `checkpoint(fn, *args)`
runs fn without recording its graph, so none of its inner activations are kept, and records
one node in its place. That node's backward runs fn again, recording this time, on detached
copies of the saved inputs, and backpropagates the incoming output gradients through the
recomputed graph. Cut a chain of N layers into sqrt(N) checkpointed segments and backward
holds the sqrt(N) segment inputs plus one segment's activations at a time.

NOTE: where the gradients of parameters used inside fn go.
- Parameters the node knows of, namely those of fn when fn is a Module or a Module's bound
  method, those of checkpoint_sequential's modules, and tensors passed as arguments, are
  inputs of the node: their gradients come back through the outer backward like any op's,
  so each is accumulated once per pass, summed over all its uses, and its post-accumulate-grad
  hook fires once, when the gradient is final (what data parallelism needs).
- Any other leaf that requires grad and is reached inside fn (a closure over a parameter) gets
  its gradient accumulated directly by the outermost checkpoint's backward, which fires its hooks
  right then; such a leaf that is also used outside has its hooks fire once per use, and dt.grad()
  through the checkpoint still accumulates into its .grad. Pass such tensors as arguments to avoid both.
- Nested checkpoints (a checkpoint inside fn: nested segments, binomial plans) share one sum per
  leaf: the outermost checkpoint's backward (the one not running inside another's) opens it, the
  backward passes of every checkpoint inside add the gradients of the leaves they reach into it in
  place (autograd.grad's sum_into) and return None for their parameters, and the outermost one
  returns (or accumulates) the sums. The parameter gradients held then cost one copy whatever the
  depth, where a sum per level would cost one copy per level. A leaf that a rerun reaches but whose
  gradient turns out to be None comes back as zeros.
NOTE: the RNG state (dt.get_rng_state()) is taken before the first run and replayed for the
recomputation, so dropout draws the same masks, on the CPU and on the GPU alike (the GPU's generator
is counter-based: its state is a seed and an offset); the generators then continue where they were.
"""
import threading
from contextlib import nullcontext

from disttrain.autograd import grad_mode
from disttrain.autograd.engine import grad
from disttrain.autograd.function import AccumulateGrad, Function, accumulator_of, next_sequence
from disttrain.tensor import dtypes
from disttrain.tensor.creation import zeros
from disttrain.tensor.random import fork_rng, get_rng_state
from disttrain.tensor.tensor import Tensor

_ARG = object()  # stands for a tensor argument in the saved argument list


class Checkpoint(Function):
    """The node standing for one checkpointed call of fn, made by Function.apply like any op's.

    Inputs (edges): the tensor arguments, then the known parameters, then (only when none of
    those requires grad and fn may use other leaves) an anchor: a 0-d leaf that requires grad, so
    Function.apply records the node; it gets no gradient. Outputs: fn's floating-point tensor
    outputs; its other outputs are returned as they are.
    """

    same_dtype = False  # token ids (int64) and float activations are inputs alike

    def forward(self, *arrays, fn, template, tensors, rng_state, whole):
        """fn on the tensors themselves (the arrays are their data) under no_grad; `whole` receives fn's
        result, of which the floating-point tensors become this node's outputs."""
        self.fn, self.args, self.rng_state = fn, template, rng_state
        self.n_args = _count_args(template)
        self.saved = tuple([(t, t.version) for t in tensors])  # checked for in-place changes in backward
        with grad_mode.no_grad():
            result = fn(*_fill(template, iter(tensors)))
        outputs, _ = _split(result)
        self.out_positions = [i for i, o in enumerate(outputs) if dtypes.is_floating(o.dtype)]
        self.n_outputs = len(self.out_positions)
        whole.append(result)
        arrays = tuple(outputs[i].data for i in self.out_positions)
        return arrays[0] if self.n_outputs == 1 else arrays

    def backward(self, *grads):
        if grad_mode.is_grad_enabled():
            raise RuntimeError("checkpoint: backward with create_graph=True through a checkpointed call is not "
                               "supported; compute higher-order gradients without activation checkpointing")
        saved = self.saved_inputs  # raises on a second backward or an input changed in place
        slots, targets, copies = [], [], []
        for t in saved[:self.n_args]:
            a = t.detach()
            a.requires_grad = t.requires_grad
            slots.append(len(targets) if a.requires_grad else None)
            if a.requires_grad:
                targets.append(a)
            copies.append(a)
        known = list(saved[self.n_args:])
        first_seq = next_sequence()  # nodes numbered below this were not made by the recomputation
        with grad_mode.enable_grad(), fork_rng(self.rng_state) if self.rng_state is not None else nullcontext():
            outputs, _ = _split(self.fn(*_fill(self.args, iter(copies))))
        self._check_rerun(outputs)
        roots, seeds = [], []
        for pos, g in zip(self.out_positions, grads):
            out = outputs[pos]
            if out.requires_grad and g is not None:
                roots.append(out)
                seeds.append(g)
        reached, nests = _leaves_reached(roots, first_seq, self.fn)
        if nests or getattr(_open, "sums", None) is not None:
            found = _summed(roots, seeds, targets, known, reached)
        else:
            found = _captured(roots, seeds, targets, known, reached)
        return tuple(None if k is None else found[k] for k in slots) + tuple(found[len(targets):])

    def _check_rerun(self, outputs):
        """The rerun's floating-point outputs must sit where the first run's did: gradients are matched by position."""
        positions = [i for i, o in enumerate(outputs) if dtypes.is_floating(o.dtype)]
        if positions != self.out_positions:
            raise RuntimeError(
                f"checkpoint: {self!r} returned floating-point tensors at positions {positions} when rerun in backward "
                f"but at {self.out_positions} in its first run; fn must return the same structure in both runs")

    def release(self):
        super().release()
        self.fn = self.args = self.rng_state = None

    def __repr__(self):
        return f"<Checkpoint node of {getattr(self.fn, '__name__', type(self.fn).__name__)}>"


_open = threading.local()  # .sums: the _GradientSums of the outermost checkpoint backward running in this thread


class _GradientSums:
    """The gradients of the leaves used in an outermost checkpoint's rerun and in every checkpoint nested in it, each
    summed in place in one buffer (grad()'s sum_into), whatever the nesting depth."""

    def __init__(self):
        self.totals = {}    # id(leaf) -> (leaf, its sum)

    def sinks(self, leaves):
        """{leaf: its sum} for grad()'s sum_into; the sums of leaves met for the first time start at zero."""
        out = {}
        for leaf in leaves:
            entry = self.totals.get(id(leaf))
            if entry is None:
                zeros = leaf.backend.xp.zeros(leaf.shape, dtype=leaf.dtype)
                entry = self.totals[id(leaf)] = (leaf, Tensor._wrap(zeros))
            out[leaf] = entry[1]
        return out

    def take(self, leaf):
        """The leaf's sum, no longer summed into (None when no rerun reached the leaf)."""
        entry = self.totals.pop(id(leaf), None)
        return None if entry is None else entry[1]

    def accumulate_rest(self):
        """Accumulate every sum not taken into its leaf's .grad (leaves the outermost checkpoint does not know of)."""
        for leaf, total in self.totals.values():
            accumulator_of(leaf).accumulate(total, False, set())
        self.totals = {}


def _captured(roots, seeds, targets, known, reached):
    """The gradients of the targets and the known tensors, from one pass through a rerun with no checkpoint nested in
    it; those of the other leaves reached are accumulated into their .grad."""
    skip = {id(t) for t in targets + known}
    hidden = [leaf for leaf in reached if id(leaf) not in skip]
    wanted = targets + known + hidden
    found = grad(roots, wanted, seeds, allow_unused=True) if roots and wanted else (None,) * len(wanted)
    for leaf, g in zip(hidden, found[len(targets) + len(known):]):
        if g is not None:  # a private copy: g may share memory with a gradient returned
            accumulator_of(leaf).accumulate(Tensor._wrap(g.data.copy()), False, set())
    return found[:len(targets) + len(known)]


def _summed(roots, seeds, targets, known, reached):
    """_captured for a rerun with checkpoints nested in it, or nested itself: the gradients of the leaves reached are
    added into the outermost checkpoint's _GradientSums, which that one returns (its known leaves) or accumulates
    (the others) once its pass ends; a nested one returns None for its known leaves."""
    sums = getattr(_open, "sums", None)
    outermost = sums is None
    if outermost:
        sums = _open.sums = _GradientSums()
    try:
        copies = {id(t) for t in targets}
        summed = [leaf for leaf in reached if id(leaf) not in copies]
        wanted = targets + [t for t in known if not t.is_leaf]
        found = iter(grad(roots, wanted, seeds, allow_unused=True, sum_into=sums.sinks(summed)) if roots
                     else (None,) * len(wanted))
        out = tuple(next(found) for _ in targets) + tuple(
            next(found) if not t.is_leaf else sums.take(t) if outermost else None for t in known)
        if outermost:
            sums.accumulate_rest()
        return out
    finally:
        if outermost:
            _open.sums = None


def checkpoint(fn, *args, preserve_rng_state=True):
    """fn(*args), keeping none of fn's activations: backward runs fn again to get them.

    args may mix tensors, tuples and lists of tensors (a carried state) and other values; fn may return a
    tensor or a tuple (list) of values, tensors nested in them included. Under no_grad this is just
    fn(*args). With preserve_rng_state the recomputation draws the same random numbers (dropout masks) as
    the first run. Backward through it with create_graph=True is not supported.
    """
    leaves, opaque = parameters_of(fn)
    return checkpoint_with_leaves(fn, args, leaves, opaque, preserve_rng_state)


def checkpoint_with_leaves(fn, args, leaves, opaque, preserve_rng_state):
    """checkpoint() with the parameters fn uses given (`leaves`); `opaque`: fn may use others."""
    if not grad_mode.state.enabled:
        return fn(*args)
    tensors, template = _split(tuple(args))
    known, seen = [], {id(t) for t in tensors}
    for p in leaves:
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            known.append(p)
    if not opaque and not known and not any(t.requires_grad for t in tensors):
        return fn(*args)  # nothing inside can need a gradient
    rng_state = get_rng_state() if preserve_rng_state else None
    edge_tensors = tensors + known
    if not any(t.requires_grad for t in edge_tensors):  # fn may still use leaves of its own (opaque)
        edge_tensors.append(_anchor(edge_tensors))
    whole = []
    outs = Checkpoint.apply(*edge_tensors, fn=fn, template=template, tensors=edge_tensors, rng_state=rng_state,
                            whole=whole)
    result = whole[0]
    node = outs[0].grad_fn if isinstance(outs, tuple) and outs else getattr(outs, "grad_fn", None)
    if node is None:  # no floating-point output: nothing to differentiate
        return result
    wrapped, result_template = _split(result)
    for k, i in enumerate(node.out_positions):
        wrapped[i] = outs[k] if isinstance(outs, tuple) else outs
    return _fill(result_template, iter(wrapped))


def _anchor(tensors):
    """A 0-d leaf requiring grad on the device of `tensors` (the CPU when there are none)."""
    device = tensors[0].device if tensors else "cpu"
    return Tensor(zeros((), device=device).data, requires_grad=True)


def parameters_of(fn):
    """(parameters, opaque): a Module's (or a Module's bound method's) parameters; else ([], True): fn may
    use leaves the caller does not know of."""
    owner = fn if _is_module(fn) else getattr(fn, "__self__", None)
    if _is_module(owner):
        return list(owner.parameters()), False
    return [], True


def _is_module(obj):
    """Whether obj is an nn.Module (told by its methods: this layer sits below nn)."""
    return callable(getattr(obj, "parameters", None)) and callable(getattr(obj, "named_modules", None))


def _leaves_reached(roots, first_seq, fn):
    """(the leaves requiring grad that the rerun's graph from `roots` reaches through an op or as a root, not those
    only a nested checkpoint's parameters (whose gradients that checkpoint sums itself); whether a checkpoint is nested
    in it). Iterative walk."""
    found, seen, stack, nests = {}, set(), [], False
    for r in roots:
        if r.is_leaf:
            found[id(r)] = r
        else:
            stack.append(r.grad_fn)
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if node.seq < first_seq:
            raise RuntimeError(
                f"checkpoint: {getattr(fn, '__name__', type(fn).__name__)} uses a tensor that requires grad and was "
                f"computed outside it (by {type(node).__name__}) without taking it as an argument; pass that tensor "
                "as an argument of checkpoint() so its gradient flows back through the checkpoint")
        through = node.n_args if type(node) is Checkpoint else len(node.next_edges)
        for k, edge in enumerate(node.next_edges):
            if edge is None:
                continue
            if type(edge[0]) is not AccumulateGrad:
                stack.append(edge[0])
            elif k < through:
                found[id(edge[0].leaf)] = edge[0].leaf
        nests = nests or type(node) is Checkpoint
    return list(found.values()), nests


class _Nest:
    """A tuple or list (namedtuples included) in a template, its tensors replaced by _ARG."""

    def __init__(self, kind, parts):
        self.kind, self.parts = kind, parts

    def build(self, parts):
        return self.kind(*parts) if hasattr(self.kind, "_fields") else self.kind(parts)


def _split(value):
    """(the tensors in value, depth first; value's template: each of them replaced by _ARG)."""
    tensors = []
    return tensors, _template(value, tensors)


def _template(value, tensors):
    # a module-level function, not a closure over `tensors`: a recursive closure is a reference cycle that
    # would keep the tensors alive until the cycle collector runs
    if isinstance(value, Tensor):
        tensors.append(value)
        return _ARG
    if isinstance(value, (tuple, list)):
        return _Nest(type(value), [_template(v, tensors) for v in value])
    return value


def _fill(template, values):
    """_split's inverse: the template with each _ARG replaced by the next of `values`."""
    if template is _ARG:
        return next(values)
    if isinstance(template, _Nest):
        return template.build([_fill(p, values) for p in template.parts])
    return template


def _count_args(template):
    if template is _ARG:
        return 1
    return sum(_count_args(p) for p in template.parts) if isinstance(template, _Nest) else 0
