"""Blocks: the links of the chain a pipeline cuts, and Stage, a contiguous run of them.

A block is a Module with forward(x, state=None) -> (y, new_state): block i's output y is block
i+1's input x, and `state` is the block's own carried recurrent state (None when it has none).

    blocks = blocks_of(model)                 # [(name, Block), ...]
    stage = Stage(blocks[1:3])                # what one rank runs
    y, states = stage(x, states)              # states: one entry per block of the stage

A module an nn.Sequential places at two positions is a block at each (its parameters, used by both, keep the
two blocks in one stage: partition.py).

NOTE: blocks hold the model's own modules and Parameter objects (no copies) and name them with
the full model's names (`lstm.weight_ih_l1`, `decoder.bias`, `0.weight`), so a stage's
state_dict is a subset of the model's and the stages' state_dicts merge into the model's.
"""
from collections import OrderedDict

from disttrain.nn.containers import Sequential
from disttrain.nn.module import Module


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


class UncuttableModelError(TypeError):
    """The model is neither an nn.Sequential nor has pipeline_blocks(): pipeline mode cannot cut it."""


def blocks_of(model):
    """The model as a chain of blocks: [(name, Block), ...] in data-flow order.

    - a model with a `pipeline_blocks()` method (a model family's own cut, disttrain.models.protocol): what it
      returns, checked to be (unique name, Module) pairs covering every parameter;
    - nn.Sequential: one stateless block per position, named as the child there ("0", "1", ...); a module
      placed at two positions is a block at each.
    Blocks start in the model's training mode.
    """
    if hasattr(model, "pipeline_blocks"):
        blocks = _checked(model, list(model.pipeline_blocks()))
    elif isinstance(model, Sequential):
        blocks = [(name, ModuleBlock(name, child)) for name, child in model.named_positions()]
    else:
        raise UncuttableModelError(
            f"blocks_of: cannot cut a {type(model).__name__} into pipeline blocks; supported are nn.Sequential and "
            "models that define pipeline_blocks() returning [(name, Block), ...] where Block.forward(x, state=None) "
            "-> (y, new_state) (disttrain.parallel.pipeline.blocks.ModuleBlock(name, module) makes a stateless "
            "module a Block)")
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
