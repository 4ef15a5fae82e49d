"""The backward engine: reverse topological order, iteratively (no recursion), with readiness counts.

1. Walk the graph from the roots once, counting for every node how many edges point at it.
2. Run nodes from a ready-queue (most recently created first). A node is ready when every
   edge into it has delivered its gradient, so its gradient buffer holds the final sum.
3. A leaf's AccumulateGrad node runs the moment it becomes ready: that is the instant the
   leaf's gradient is final within this pass, which fires post-accumulate hooks early enough
   for data parallelism to overlap allreduce with the rest of backward.
4. Callbacks that hooks queued during the pass (queue_callback) run once every node has run,
   before backward() / grad() returns (data parallelism waits for its last buckets there).
"""
import heapq
import threading

from disttrain.autograd import grad_mode
from disttrain.autograd.function import AccumulateGrad, accumulator_of
from disttrain.tensor.tensor import Tensor


def backward(tensors, grad_tensors=None, retain_graph=False, create_graph=False):
    """Accumulate gradients of `tensors` into the .grad of every leaf that requires grad."""
    roots = _roots(tensors, grad_tensors, "backward")
    _run(roots, retain_graph or create_graph, create_graph, capture=None)


def grad(outputs, inputs, grad_outputs=None, retain_graph=None, create_graph=False, allow_unused=False, *,
         sum_into=None):
    """Gradients of `outputs` w.r.t. `inputs`, returned instead of accumulated into .grad: a tuple with one
    entry per input, also for a single input Tensor (as torch's, so `grad(y, x)[0]` is the gradient).

    sum_into: {leaf: Tensor of the leaf's shape and dtype}. The gradients that reach each of these leaves are
    added into its tensor in place, neither returned nor accumulated into .grad (no hooks fire), so that several
    passes can sum into one buffer (nested checkpoints do). This pass writes into those tensors: pass ones that
    nothing else reads or holds as a gradient. Not with create_graph.
    """
    outputs = [outputs] if isinstance(outputs, Tensor) else list(outputs)
    inputs = [inputs] if isinstance(inputs, Tensor) else list(inputs)
    roots = _roots(outputs, grad_outputs, "grad")
    capture = {}
    for i, t in enumerate(inputs):
        if not t.requires_grad:
            raise RuntimeError(f"grad: input {i} (shape {t.shape}) does not require grad")
        node, index = (accumulator_of(t), 0) if t._node is None else (t._node, t._out_index)
        capture.setdefault(node, []).append((index, i))
    sums = _sum_slots(sum_into, capture, create_graph) if sum_into else None
    results = [None] * len(inputs)
    _run(roots, create_graph if retain_graph is None else retain_graph, create_graph, capture, results, sums)
    for i, r in enumerate(results):
        if r is None and not allow_unused:
            raise RuntimeError(f"grad: input {i} (shape {inputs[i].shape}) is not reachable from the outputs; "
                               "pass allow_unused=True to get None for it")
    return tuple(results)


def queue_callback(callback):
    """Run callback() when the backward pass now running finishes, before its backward() / grad() returns.

    Call it from a hook during backward (torch's queue_callback). The callbacks of a pass run in the
    order queued, after every node and hook of the pass, in the caller's grad mode; one may queue
    more, which run in the same round. A pass that runs inside another (grad() called from a
    checkpoint's backward) has its own queue. When the pass raises, its queued callbacks are
    dropped unrun; when a callback raises, the rest are dropped and the error reaches the caller
    of backward(). Each pass starts with an empty queue (retain_graph or not): a hook that wants a
    callback every pass queues it every pass.
    """
    passes = getattr(_running, "passes", None)
    if not passes:
        raise RuntimeError("queue_callback: no backward pass is running; call it from a hook while "
                           "backward() or grad() runs")
    passes[-1].append(callback)


_running = threading.local()  # .passes: one callback list per backward pass running in this thread


def _roots(tensors, grads, caller):
    """Pair each output with its seed gradient, checking what the user passed."""
    tensors = [tensors] if isinstance(tensors, Tensor) else list(tensors)
    if grads is None:
        grads = [None] * len(tensors)
    elif isinstance(grads, Tensor):
        grads = [grads]
    roots = []
    for t, g in zip(tensors, grads):
        if not t.requires_grad:
            raise RuntimeError(f"{caller}: the tensor (shape {t.shape}) does not require grad and has no grad_fn; "
                               "did you create it under no_grad, or forget requires_grad=True on the inputs?")
        if g is None:
            if t.data.size != 1:
                raise RuntimeError(f"{caller}: gradient can be implicitly created only for scalar outputs, but the "
                                   f"output has shape {t.shape}; pass gradient=<tensor of shape {t.shape}> "
                                   "(or reduce it first, e.g. loss.sum())")
            g = Tensor._wrap(t.backend.xp.ones(t.shape, dtype=t.dtype))
        elif not isinstance(g, Tensor):
            g = Tensor._wrap(t.backend.asarray(g, dtype=t.dtype))
        if g.shape != t.shape:
            raise RuntimeError(f"{caller}: gradient shape {g.shape} does not match output shape {t.shape}")
        node = t._node if t._node is not None else accumulator_of(t)
        roots.append((node, t._out_index, g))
    return roots


def _count_dependencies(roots):
    """Number of edges pointing at each node reachable from the set `roots` (iterative DFS)."""
    deps = {}
    stack = list(roots)
    while stack:
        for edge in stack.pop().next_edges:
            if edge is None:
                continue
            nxt = edge[0]
            count = deps.get(nxt)
            if count is None:  # first visit: walk on from it (a root is walked from the start)
                deps[nxt] = 1
                if nxt not in roots:
                    stack.append(nxt)
            else:
                deps[nxt] = count + 1
    return deps


def _sum_slots(sum_into, capture, create_graph):
    """grad()'s sum_into, checked, as (the leaf's AccumulateGrad node, its sum) pairs."""
    if create_graph:
        raise RuntimeError("grad: sum_into cannot be used with create_graph=True (the sums are added in place)")
    slots = []
    for leaf, total in sum_into.items():
        if not isinstance(leaf, Tensor) or leaf._node is not None or not leaf.requires_grad:
            raise RuntimeError(f"grad: sum_into's keys must be leaves that require grad, got {leaf!r}")
        if not isinstance(total, Tensor) or total.shape != leaf.shape or total.dtype != leaf.dtype:
            raise RuntimeError(f"grad: sum_into's tensor for the leaf of shape {leaf.shape} ({leaf.dtype}) must be a "
                               f"Tensor of that shape and dtype, got {getattr(total, 'shape', type(total).__name__)}")
        node = accumulator_of(leaf)
        if node in capture:
            raise RuntimeError(f"grad: a leaf (shape {leaf.shape}) is both in inputs and in sum_into")
        slots.append((node, total))
    return slots


def _seed_sums(buffers, owned, sums):
    """Start each summed leaf's gradient buffer as its sum, owned by this pass: every gradient that reaches the leaf
    is then added into it in place (_add_to_slot)."""
    for node, total in sums:
        buffers[node] = [total]
        owned.add((node, 0))


def _run(roots, retain_graph, create_graph, capture, results=None, sums=None):
    """One backward pass, then the callbacks its hooks queued (see queue_callback)."""
    passes = getattr(_running, "passes", None)
    if passes is None:
        passes = _running.passes = []
    callbacks = []
    passes.append(callbacks)
    try:
        _execute(roots, retain_graph, create_graph, capture, results, sums)
        for callback in callbacks:  # a list grown while iterated: callbacks queued by callbacks run too
            callback()
    finally:
        passes.pop()


def _execute(roots, retain_graph, create_graph, capture, results, sums=None):
    root_nodes = {node for node, _, _ in roots}
    deps = _count_dependencies(root_nodes)
    buffers = {}
    owned = None if create_graph else set()  # the (node, slot)s whose sum this pass allocated (or was given)
    given = {_owner(g.data) for _, _, g in roots}  # memory a leaf's .grad must copy: see _private
    if sums:
        _seed_sums(buffers, owned, sums)
    for node, index, g in roots:
        _accumulate(buffers, node, index, g, owned)
    ready = [(-node.seq, id(node), node) for node in root_nodes if node not in deps]
    heapq.heapify(ready)
    # the loop runs once per node: its common steps are inlined, its names bound locally
    pop, push, pushpop, accumulate_grad = heapq.heappop, heapq.heappush, heapq.heappushpop, AccumulateGrad
    with grad_mode.set_grad_enabled(create_graph):
        node = pop(ready)[2] if ready else None
        while node is not None:
            grads = buffers.pop(node)  # a taken slot gets no more gradient this pass (see _add_to_slot)
            if capture is not None:
                _capture(capture, node, grads, results)
            if type(node) is accumulate_grad:
                if capture is None and grads[0] is not None:
                    node.accumulate(grads[0], create_graph, given)
                node = pop(ready)[2] if ready else None
                continue
            in_grads = _apply_node(node, grads, given)
            if len(in_grads) > 1:
                _mark_shared(in_grads, given)
            if not retain_graph:
                node.release()
            newly_ready = None
            for edge, g in zip(node.next_edges, in_grads):
                if edge is None:
                    continue
                nxt = edge[0]
                if g is not None:
                    buf = buffers.get(nxt)
                    if buf is None:
                        if nxt.n_outputs == 1:
                            buffers[nxt] = [g]
                        else:
                            buf = buffers[nxt] = [None] * nxt.n_outputs
                            buf[edge[1]] = g
                    else:
                        _add_to_slot(buf, nxt, edge[1], g, owned)
                elif nxt not in buffers:
                    buffers[nxt] = [None] * nxt.n_outputs
                remaining = deps[nxt] - 1
                deps[nxt] = remaining
                if remaining == 0:
                    if type(nxt) is accumulate_grad and capture is None:
                        g_leaf = buffers.pop(nxt)[0]  # final: run now so grad-ready hooks fire early
                        if g_leaf is not None:
                            nxt.accumulate(g_leaf, create_graph, given)
                        g_leaf = None
                    elif newly_ready is None:
                        newly_ready = nxt
                    else:
                        push(ready, (-nxt.seq, id(nxt), nxt))
            # hold no gradient while the next node runs: a checkpoint's backward runs a whole pass, and at each
            # level of nesting such a leftover (an embedding's weight gradient) would stay alive throughout
            in_grads = g = None
            if newly_ready is not None:  # the common chain: it runs next unless a later-created node waits
                node = pushpop(ready, (-newly_ready.seq, id(newly_ready), newly_ready))[2] if ready else newly_ready
            else:
                node = pop(ready)[2] if ready else None


def _owner(array):
    return id(array if array.base is None else array.base)


def _mark_shared(in_grads, given):
    """Add to `given` the memory of every input gradient that reaches more than one place.

    That is one array (or views of it) sent to two inputs: add passes g to both. A leaf's .grad
    then gets a copy: a post-accumulate hook that changes it in place (a data-parallel average)
    must not change a gradient that backward has yet to use.
    NOTE: the gradients a node received are not compared: one it passes on (add, reshape) left its
    buffer slot when the node took it, so it sits somewhere else only where a split before marked it
    here already, where a hook saw it (marked in _apply_node) or where it is the caller's seed (marked
    from the start); a sum the pass allocated sits in one slot only.
    """
    seen = []  # a handful of ids: a list is cheaper to build and search than a set
    for g in in_grads:
        if g is not None:
            array = g.data
            owner = id(array) if array.base is None else id(array.base)  # _owner, inlined (hot)
            if owner in seen:
                given.add(owner)
            else:
                seen.append(owner)


def _accumulate(buffers, node, index, g, owned):
    """Add g into node's gradient buffer slot (see _add_to_slot)."""
    buf = buffers.get(node)
    if buf is None:
        buf = buffers[node] = [None] * node.n_outputs
    _add_to_slot(buf, node, index, g, owned)


def _add_to_slot(buf, node, index, g, owned):
    """buf[index] += g, for slot `index` of node's gradient buffer `buf`.

    The first gradient is stored as is (it may be shared with another slot: add's backward passes
    g to both inputs). Without create_graph (`owned` given), the second allocates a fresh sum that
    this pass owns, and later ones add into it in place: a weight used at every time step of an
    RNN costs one allocation, not one per step.
    NOTE: ownership belongs to the slot, not to the sum: once its node's backward took the sum, it
    may come back unchanged as an input's gradient (add, sum_to and hooks pass g through), possibly
    into several slots, and adding into it in place would change every slot that holds it. A slot
    is taken once per pass, so an owned slot never sees its sum handed out before the last add.
    """
    current = buf[index]
    if current is None:
        buf[index] = g
    elif owned is None:
        buf[index] = current + g
    elif (node, index) in owned:
        current.data += g.data
    else:
        buf[index] = current + g
        owned.add((node, index))


def _apply_node(node, grads, given):
    """Run one node's backward on its (hooked) output gradients; returns one grad per input."""
    if node.out_hooks:
        for index, hooks in node.out_hooks.items():
            for hook in hooks:
                if grads[index] is not None:
                    given.add(_owner(grads[index].data))  # a hook may keep what it sees (retain_grad does)
                    new = hook(grads[index])
                    if new is not None:
                        grads[index] = new
            if grads[index] is not None:
                given.add(_owner(grads[index].data))
    if node.n_outputs > 1:
        xp = node.xp
        grads = [g if g is not None else Tensor._wrap(xp.zeros(shape, dtype=dt))
                 for g, (shape, dt) in zip(grads, node.out_meta)]
    elif grads[0] is None:
        return (None,) * len(node.next_edges)
    if node.saved is None:
        node.saved_inputs  # raises the "backward a second time" error
    out = node.backward(*grads)
    return out if type(out) is tuple else (out,)


def _capture(capture, node, grads, results):
    for index, pos in capture.get(node, ()):
        results[pos] = grads[index]
