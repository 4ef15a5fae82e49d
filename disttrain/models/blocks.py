"""Pieces a model family builds its chain of blocks from (`pipeline_blocks()`).

A block is a Module with forward(x, state=None) -> (y, new_state) that holds some of the model's own
modules or Parameters under the model's names, so the blocks' state_dicts are pieces of the model's.
"""
from disttrain.nn.module import Module

__all__ = ["ModelPart", "ParameterSubset"]


class ModelPart(Module):
    """Some of a model's child modules, registered under their names in the model; `owner` is the model
    (not registered: its other children belong to other blocks)."""

    def __init__(self, model, names):
        super().__init__()
        object.__setattr__(self, "owner", model)
        for name in names:
            self.add_module(name, getattr(model, name))


class ParameterSubset(Module):
    """Some of a module's Parameters (the same objects) under their names in that module."""

    def __init__(self, owner, names):
        super().__init__()
        for name in names:
            self.register_parameter(name, getattr(owner, name))

    def extra_repr(self):
        return ", ".join(self._parameters)
