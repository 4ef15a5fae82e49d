"""Containers: Sequential (a chain of modules) and ModuleList (a list whose modules get registered).

Children are registered under their position ("0", "1", ...), so parameter names are
`0.weight`, `2.bias`, ... exactly as in torch.nn.Sequential / ModuleList.
"""
import operator
from collections import OrderedDict

from disttrain.autograd.grad_mode import is_grad_enabled
from disttrain.checkpointing.plan import SegmentsSetting, checkpoint_sequential
from disttrain.nn.module import Module


class _IndexedModules(Module):
    """Shared list behaviour: children named by position."""

    def __init__(self, modules=None):
        super().__init__()
        for m in modules or ():
            self.append(m)

    def _key(self, index):
        index = operator.index(index)
        n = len(self._modules)
        if not -n <= index < n:
            raise IndexError(f"index {index} is out of range for {type(self).__name__} of length {n}")
        return list(self._modules)[index % n]

    def __getitem__(self, index):
        if isinstance(index, slice):
            return type(self)(list(self._modules.values())[index])
        return self._modules[self._key(index)]

    def __setitem__(self, index, module):
        self.add_module(self._key(index), module)

    def __delitem__(self, index):
        keys = list(self._modules)
        doomed = keys[index] if isinstance(index, slice) else [self._key(index)]
        for k in doomed:
            del self._modules[k]
        kept = list(self._modules.values())  # renumber so names stay 0..n-1
        self._modules.clear()
        for i, m in enumerate(kept):
            self._modules[str(i)] = m

    def __len__(self):
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules.values())

    def append(self, module):
        self.add_module(str(len(self._modules)), module)
        return self

    def extend(self, modules):
        for m in modules:
            self.append(m)
        return self


class Sequential(_IndexedModules):
    """Sequential(m0, m1, ...) or Sequential(OrderedDict(name=module)): forward(x) = ...m1(m0(x)).

    checkpoint_segments (None, "sqrt", an int or a Plan over the modules; may be changed at any time):
    activation checkpointing of the chain while training with grad enabled (checkpoint_sequential);
    evaluation and no_grad run it plainly.
    """

    checkpoint_segments = SegmentsSetting()
    checkpoint_unit = "modules"           # what the chain's items are, for plan descriptions

    def __init__(self, *modules):
        if len(modules) == 1 and isinstance(modules[0], OrderedDict):
            super().__init__()
            for name, m in modules[0].items():
                self.add_module(name, m)
        else:
            super().__init__(modules)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return Sequential(OrderedDict(list(self._modules.items())[index]))
        return self._modules[self._key(index)]

    def named_positions(self):
        """(name, module) for every position of the chain in order: a module placed at two positions comes at
        both (named_children() yields each module once, as torch's does)."""
        return iter(self._modules.items())

    def forward(self, x):
        if self.checkpoint_segments is not None and self.training and is_grad_enabled():
            return checkpoint_sequential(list(self._modules.values()), self.checkpoint_segments, x)
        for m in self._modules.values():
            x = m(x)
        return x

    def extra_repr(self):
        return f"checkpoint_segments={self.checkpoint_segments!r}" if self.checkpoint_segments else ""


class ModuleList(_IndexedModules):
    """A list of modules, registered so their parameters are found; it has no forward()."""

    def insert(self, index, module):
        mods = list(self._modules.values())
        mods.insert(index, module)
        self._modules.clear()
        for i, m in enumerate(mods):
            self.add_module(str(i), m)
