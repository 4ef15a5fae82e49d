"""Blocks: the links of the chain a pipeline cuts, and Stage, a contiguous run of them.

A block is a Module with forward(x, state=None) -> (y, new_state): block i's output y is block
i+1's input x, and `state` is the block's own carried recurrent state (None when it has none).

    blocks = blocks_of(model)                 # [(name, Block), ...]
    stage = Stage(blocks[1:3])                # what one rank runs
    y, states = stage(x, states)              # states: one entry per block of the stage

NOTE: blocks hold the model's own modules and Parameter objects (no copies) and name them with
the full model's names (`lstm.weight_ih_l1`, `decoder.bias`, `0.weight`), so a stage's
state_dict is a subset of the model's and the stages' state_dicts merge into the model's.
"""
from collections import OrderedDict

from disttrain.autograd.ops import dropout, stack, unbind
from disttrain.models.lstm_lm import LSTMLanguageModel
from disttrain.nn.containers import Sequential
from disttrain.nn.module import Module
from disttrain.tensor.creation import zeros
from disttrain.tensor.tensor import Tensor


class Block(Module):
    """One link of the chain: forward(x, state=None) -> (y, new_state)."""

    def forward(self, x, state=None):
        raise NotImplementedError(f"{type(self).__name__} does not define forward(x, state=None)")


class ModuleBlock(Block):
    """A stateless module (a Sequential child) as a block, registered under its name in the model."""

    def __init__(self, name, module):
        super().__init__()
        self.add_module(name, module)
        object.__setattr__(self, "module", module)

    def forward(self, x, state=None):
        return self.module(x), None


class _LanguageModelPart(ModuleBlock):
    """The model's module named `part`, with the model's dropout rate (read at each forward)."""

    part = None

    def __init__(self, model):
        super().__init__(self.part, getattr(model, self.part))
        object.__setattr__(self, "owner", model)  # not registered: only `part` is this block's

    @property
    def p(self):
        return self.owner.dropout


class EmbeddingBlock(_LanguageModelPart):
    """LSTMLanguageModel's embedding and the dropout on its output: tokens (T, B) -> (T, B, E)."""

    part = "embedding"

    def forward(self, tokens, state=None):
        return dropout(self.module(tokens), self.p, self.training), None


class LSTMLayerBlock(Block):
    """Layer k of an nn.LSTM: x (T, B, in) -> (T, B, H), state (h, c) each (B, H) (zeros when None).

    Holds only layer k's four Parameters (named `lstm.weight_ih_l{k}`, ...) and runs
    LSTM._layer, so the LSTM's recurrent checkpointing setting applies; the LSTM's dropout
    follows every layer but the last, as in LSTM.forward.
    """

    def __init__(self, lstm, layer, prefix="lstm"):
        super().__init__()
        self.add_module(prefix, _ParameterSubset(lstm, [f"{w}_l{layer}" for w in
                                                       ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]))
        object.__setattr__(self, "lstm", lstm)  # not registered: its other layers belong to other blocks
        object.__setattr__(self, "layer", layer)

    def forward(self, x, state=None):
        lstm = self.lstm
        batch, hidden = x.shape[1], lstm.hidden_size
        if state is None:
            h = c = zeros(batch, hidden, dtype=x.dtype, device=x.device)
        else:
            h, c = state
            for t, name in ((h, "h"), (c, "c")):
                if t.shape != (batch, hidden):
                    raise ValueError(f"LSTM layer {self.layer} block: state {name} has shape {t.shape}, "
                                     f"expected {(batch, hidden)} (B, H)")
        out, h, c = lstm._layer(self.layer, x, h, c)
        if lstm.dropout and self.training and self.layer < lstm.num_layers - 1:
            out = dropout(out, lstm.dropout, training=True)
        return out, (h, c)


class DecoderBlock(_LanguageModelPart):
    """LSTMLanguageModel's dropout + decoder: (T, B, H) -> logits (T*B, V)."""

    part = "decoder"

    def forward(self, x, state=None):
        steps, batch, hidden = x.shape
        x = dropout(x, self.p, self.training)
        return self.module(x.reshape((steps * batch, hidden))), None


class _ParameterSubset(Module):
    """Some of a module's Parameters (the same objects) under their names in that module."""

    def __init__(self, owner, names):
        super().__init__()
        for name in names:
            self.register_parameter(name, getattr(owner, name))

    def extra_repr(self):
        return ", ".join(self._parameters)


def blocks_of(model):
    """The model as a chain of blocks: [(name, Block), ...] in data-flow order.

    - a model with a `pipeline_blocks()` method: what it returns;
    - nn.Sequential: one stateless block per child, named as the child ("0", "1", ...);
    - LSTMLanguageModel: "embedding", "lstm.l0" ... "lstm.l{L-1}", "decoder".
    Blocks start in the model's training mode.
    """
    if hasattr(model, "pipeline_blocks"):
        blocks = _checked(model, list(model.pipeline_blocks()))
    elif isinstance(model, Sequential):
        blocks = [(name, ModuleBlock(name, child)) for name, child in model._modules.items() if child is not None]
    elif isinstance(model, LSTMLanguageModel):
        blocks = ([("embedding", EmbeddingBlock(model))]
                  + [(f"lstm.l{k}", LSTMLayerBlock(model.lstm, k)) for k in range(model.lstm.num_layers)]
                  + [("decoder", DecoderBlock(model))])
    else:
        raise TypeError(f"blocks_of: cannot cut a {type(model).__name__} into pipeline blocks; supported are "
                        "nn.Sequential, LSTMLanguageModel, and models that define pipeline_blocks() returning "
                        "[(name, Block), ...] where Block.forward(x, state=None) -> (y, new_state)")
    if not blocks:
        raise ValueError(f"blocks_of: {type(model).__name__} has no blocks (an empty Sequential?)")
    for _, block in blocks:
        object.__setattr__(block, "training", model.training)
    return blocks


def _checked(model, blocks):
    """pipeline_blocks()'s answer, verified: (unique name, Module) pairs covering every parameter."""
    names = []
    for item in blocks:
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)
                and isinstance(item[1], Module)):
            raise TypeError(f"{type(model).__name__}.pipeline_blocks() must return (name, Module) pairs, "
                            f"got {item!r}")
        names.append(item[0])
    if len(set(names)) != len(names):
        raise ValueError(f"{type(model).__name__}.pipeline_blocks(): block names repeat: {names}")
    covered = {id(p) for _, b in blocks for p in b.parameters()}
    missing = [n for n, p in model.named_parameters() if id(p) not in covered]
    if missing:
        raise ValueError(f"{type(model).__name__}.pipeline_blocks(): parameters in no block: {missing}")
    return blocks


class Stage(Module):
    """A contiguous run of blocks: forward(x, states=None) -> (y, states), one state per block.

    Stage(blocks) takes Blocks or (name, Block) pairs. parameters(), named_parameters(),
    state_dict() and load_state_dict() use the full model's names; train()/eval() reach every
    block and the model modules inside them.
    """

    def __init__(self, blocks):
        super().__init__()
        blocks = list(blocks)
        if not blocks:
            raise ValueError("Stage needs at least one block")
        pairs = [b if isinstance(b, tuple) else (str(i), b) for i, b in enumerate(blocks)]
        for name, block in pairs:
            if not isinstance(block, Module):
                raise TypeError(f"Stage: block {name!r} is a {type(block).__name__}, not a Module")
        # plain attributes, not registered children: a registered child would prefix every name
        object.__setattr__(self, "block_names", tuple(name for name, _ in pairs))
        object.__setattr__(self, "blocks", tuple(block for _, block in pairs))

    def forward(self, x, states=None):
        if states is None:
            states = [None] * len(self.blocks)
        elif len(states) != len(self.blocks):
            raise ValueError(f"Stage: got {len(states)} states for {len(self.blocks)} blocks {list(self.block_names)}")
        new_states = []
        for block, state in zip(self.blocks, states):
            x, state = block(x, state)
            new_states.append(state)
        return x, new_states

    # ---- the blocks' modules under the full model's names ----------------------------------------
    def named_modules(self, memo=None, prefix=""):
        memo = set() if memo is None else memo
        yield from super().named_modules(memo, prefix)  # the stage itself: it registers no children
        for block in self.blocks:  # each block's children carry the model's top-level names
            yield from block.named_modules(memo, prefix)

    def named_children(self):
        return iter(zip(self.block_names, self.blocks))

    def state_dict(self, destination=None, prefix="", keep_vars=False):
        out = OrderedDict() if destination is None else destination
        for block in self.blocks:
            block.state_dict(out, prefix, keep_vars)
        return out

    def __repr__(self):
        lines = [f"  ({name}): " + repr(block).replace("\n", "\n  ") for name, block in self.named_children()]
        return "Stage(\n" + "\n".join(lines) + "\n)"


# ---- carried state ---------------------------------------------------------------------------------
def detach_state(state):
    """state with every tensor detached (None, a Tensor, or tuples/lists of them): what TBPTT carries."""
    if state is None:
        return None
    if isinstance(state, Tensor):
        return state.detach()
    return type(state)(detach_state(s) for s in state)


def split_state(blocks, model_state):
    """The model's own state as one entry per block (None for stateless blocks).

    LSTMLanguageModel: (h, c) each (L, B, H) -> layer k's block gets (h[k], c[k]).
    `blocks`: Blocks or (name, Block) pairs, e.g. blocks_of(model).
    """
    blocks = _bare(blocks)
    if model_state is None:
        return [None] * len(blocks)
    layers = [b for b in blocks if isinstance(b, LSTMLayerBlock)]
    if not layers:
        raise ValueError("split_state: a model state was given but no block carries state "
                         f"(blocks: {[type(b).__name__ for b in blocks]})")
    hs, cs = (unbind(t, 0) for t in model_state)
    return [(hs[b.layer], cs[b.layer]) if isinstance(b, LSTMLayerBlock) else None for b in blocks]


def merge_state(blocks, states):
    """split_state's inverse over a whole model's blocks: the LSTM layers' (h, c) stacked to (L, B, H)."""
    pairs = sorted(((b.layer, s) for b, s in zip(_bare(blocks), states) if isinstance(b, LSTMLayerBlock)),
                   key=lambda pair: pair[0])
    if not pairs:
        return None
    layers = [k for k, _ in pairs]
    if layers != list(range(len(layers))):
        raise ValueError(f"merge_state: needs every LSTM layer's state, got layers {layers}")
    return stack([s[0] for _, s in pairs]), stack([s[1] for _, s in pairs])


def _bare(blocks):
    return [b[1] if isinstance(b, tuple) else b for b in blocks]
