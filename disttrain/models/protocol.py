"""What the training loop asks of a model: the contract of a model family, and its defaults.

Any nn.Module trains. The loop calls these functions, never the model's methods directly, so each optional
method below has a default and a model implements only what differs:

    forward(inputs) -> output                       a stateless model (an MLP), or
    forward(inputs, state) -> (output, state)       a recurrent one: set `carries_state = True`
    loss(output, targets) -> scalar Tensor          default: cross-entropy of output's rows against the
                                                    targets flattened to one class index per row; a mean
                                                    over the examples given (shares' losses are averaged)
    forward_loss(inputs, targets, state=None)       default: loss(forward(inputs[, state])); a family may fuse
        -> (loss, state)                            the two, e.g. to checkpoint time segments of both

Carried state (truncated BPTT). A recurrent model's state is a Tensor or a nest of tuples/lists of them, each
with the batch's streams along `state_batch_axis` (default 0; the LSTM LM's (h, c) of (L, B, H): 1). The
loop starts each epoch from None (the model's zeros), detaches the state between segments, and lets the
modes split it across ranks and micro-batches and join it for a checkpoint; the defaults below do that along
`state_batch_axis`. A model whose state is not such a nest overrides `detach_state(state)`,
`split_state(state, parts)` and `join_state(parts)`.

Pipeline parallelism cuts a model along `pipeline_blocks()` -> [(name, block)], each block a Module with
forward(x, state=None) -> (y, new_state) holding the model's own modules (an nn.Sequential's children need
nothing). A recurrent model that is cut also maps its state to its blocks' states and back:
`block_states(state) -> {block name: state}` and `state_from_blocks({block name: state}) -> state`.
"""
import numpy as np

from disttrain.autograd.function import OpError
from disttrain.autograd.ops import concat, split
from disttrain.nn import functional as F
from disttrain.tensor.creation import tensor
from disttrain.tensor.tensor import Tensor

__all__ = ["carries_state", "forward_loss", "output_loss", "detach_state", "detach_tensors", "split_state", "join_state",
           "state_to_arrays", "state_from_arrays", "block_states", "state_from_blocks"]


def carries_state(model):
    """True for a recurrent model: forward(inputs, state) -> (output, state)."""
    return bool(getattr(model, "carries_state", False))


def forward_loss(model, inputs, targets, state=None):
    """(loss Tensor, new state) of one batch: the model's own forward_loss, or its loss on its forward."""
    own = getattr(model, "forward_loss", None)
    if own is not None:
        return own(inputs, targets, state)
    if carries_state(model):
        output, state = model(inputs, state)
    else:
        output = model(inputs)
    return output_loss(model, output, targets), state


def output_loss(model, output, targets):
    """The model's loss of `output` against `targets`: its loss(), or the mean cross-entropy of output's rows."""
    own = getattr(model, "loss", None)
    if own is not None:
        return own(output, targets)
    if not isinstance(output, Tensor):
        raise OpError(f"{type(model).__name__}: forward returned a {type(output).__name__}, and the default loss "
                      "(cross-entropy) takes one Tensor of (rows, classes); define loss(output, targets) on the "
                      "model to say how its output is scored")
    if output.ndim != 2:
        raise OpError(f"{type(model).__name__}: the default loss (cross-entropy) expects an output of "
                      f"(rows, classes), got shape {output.shape}; define loss(output, targets) or forward_loss")
    if targets.numel() != output.shape[0]:
        raise OpError(f"{type(model).__name__}: the default loss (cross-entropy) expects one class index per row "
                      f"of the output {output.shape}, got targets of shape {targets.shape}; define loss(output, "
                      f"targets) or forward_loss for other targets")
    return F.cross_entropy(output, targets.reshape((-1,)))


def detach_state(model, state):
    """The state cut from its graph: what a TBPTT segment carries into the next."""
    own = getattr(model, "detach_state", None)
    if own is not None:
        return own(state)
    return detach_tensors(state)


def state_tensors(state):
    """The Tensors in a carried state, a nest of tuples and lists ((h, c), or one per pipeline micro-batch)."""
    if isinstance(state, Tensor):
        return [state]
    if isinstance(state, (tuple, list)):
        return [t for part in state for t in state_tensors(part)]
    return []


def detach_tensors(state):
    """Every Tensor of a nest of tuples and lists detached (None stays None)."""
    return _map_tensors(state, lambda t: t.detach())


def split_state(model, state, parts):
    """The state cut into `parts` equal shares of its streams (None: every share None)."""
    own = getattr(model, "split_state", None)
    if own is not None:
        return own(state, parts)
    if state is None:
        return [None] * parts
    axis = _batch_axis(model)
    return [_split_nest(state, parts, axis, k) for k in range(parts)]


def join_state(model, parts):
    """split_state's inverse: the shares side by side along the streams (None when every share is None)."""
    own = getattr(model, "join_state", None)
    if own is not None:
        return own(parts)
    if all(p is None for p in parts):
        return None
    return _zip_nests(parts, lambda leaves: concat(leaves, _batch_axis(model)))


def state_to_arrays(state, prefix="state"):
    """{name: NumPy array} of a state's tensors ("state.0", "state.1.0", ...): how checkpoints store it."""
    out = {}

    def visit(value, name):
        if isinstance(value, Tensor):
            out[name] = value.numpy()
        elif isinstance(value, (tuple, list)):
            for i, v in enumerate(value):
                visit(v, f"{name}.{i}")
        elif value is not None:
            raise TypeError(f"a carried state holds Tensors in tuples and lists, got {type(value).__name__} at "
                            f"{name}")

    visit(state, prefix)
    return out


def state_from_arrays(arrays, prefix="state", device="cpu"):
    """state_to_arrays' inverse over the names starting with `prefix` (None when there are none). Arrays
    may be NumPy arrays or Tensors; the nest comes back as tuples."""
    names = sorted(n for n in arrays if n == prefix or n.startswith(prefix + "."))
    if not names:
        return None
    if names == [prefix]:
        return _as_tensor(arrays[prefix], device)
    children = sorted({int(n[len(prefix) + 1:].split(".")[0]) for n in names})
    if children != list(range(len(children))):
        raise ValueError(f"carried state {prefix!r}: entries {children} are not 0..{len(children) - 1}")
    return tuple(state_from_arrays(arrays, f"{prefix}.{i}", device) for i in children)


def block_states(model, blocks, state):
    """One state per block of `blocks` ([(name, block)]), from the model's state (None: every block None)."""
    if state is None:
        return [None] * len(blocks)
    per_block = _pipeline_state_method(model, "block_states(state)", "give each block its part")(state)
    return [per_block.get(name) for name, _ in blocks]


def state_from_blocks(model, blocks, states):
    """block_states' inverse over every block of the model: the model's state (None when no block has one)."""
    named = {name: s for (name, _), s in zip(blocks, states) if s is not None}
    if not named:
        return None
    return _pipeline_state_method(model, "state_from_blocks(states)", "join its blocks' states into the model's")(named)


def _pipeline_state_method(model, signature, purpose):
    """The model's own method `signature` names; TypeError naming the model's class when it has none."""
    own = getattr(model, signature.partition("(")[0], None)
    if own is None:
        raise TypeError(f"{type(model).__name__} carries a state but defines no {signature}: a pipeline cannot "
                        f"{purpose}")
    return own


def _batch_axis(model):
    return int(getattr(model, "state_batch_axis", 0))


def _map_tensors(value, fn):
    if value is None:
        return None
    if isinstance(value, Tensor):
        return fn(value)
    return type(value)(_map_tensors(v, fn) for v in value)


def _split_nest(value, parts, axis, k):
    if isinstance(value, Tensor):
        width = value.shape[axis]
        if width % parts:
            raise ValueError(f"a carried state of {width} streams (axis {axis}) does not split into {parts} "
                             f"equal shares")
        return split(value, width // parts, axis)[k]
    if value is None:
        return None
    return type(value)(_split_nest(v, parts, axis, k) for v in value)


def _zip_nests(nests, combine):
    first = nests[0]
    if isinstance(first, Tensor):
        return combine(list(nests))
    return type(first)(_zip_nests([n[i] for n in nests], combine) for i in range(len(first)))


def _as_tensor(array, device):
    if isinstance(array, Tensor):
        return array
    return tensor(np.ascontiguousarray(array), device=device)
