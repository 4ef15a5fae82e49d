"""Module: the base class of layers and models.

Assigning a Parameter, a Module or (through register_buffer) a buffer Tensor to an attribute
registers it; iteration follows registration order, so parameter names and order are the
same on every process and match the equivalent PyTorch model's state_dict keys.
NOTE: names are dotted paths (`encoder.0.weight`); a parameter reachable under two names
(tied weights) is yielded once by parameters()/named_parameters() but stored under both
names by state_dict(), as PyTorch does.
"""
from collections import OrderedDict, namedtuple

import numpy as np

from disttrain.autograd.grad_mode import no_grad
from disttrain.nn.parameter import Parameter
from disttrain.tensor import dtypes
from disttrain.tensor.backend import backend_of_array, get_backend
from disttrain.tensor.tensor import Tensor

IncompatibleKeys = namedtuple("IncompatibleKeys", ["missing_keys", "unexpected_keys"])


class Module:
    """Subclasses call super().__init__() first, assign layers and Parameters, and define forward()."""

    def __init__(self):
        object.__setattr__(self, "training", True)
        object.__setattr__(self, "_parameters", OrderedDict())
        object.__setattr__(self, "_buffers", OrderedDict())
        object.__setattr__(self, "_non_persistent", set())
        object.__setattr__(self, "_modules", OrderedDict())

    def forward(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} does not define forward()")

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    # ---- registration ----------------------------------------------------------------------
    def __setattr__(self, name, value):
        if "_parameters" not in self.__dict__:
            if isinstance(value, (Parameter, Module)):
                raise AttributeError(f"cannot assign {type(value).__name__} '{name}' before Module.__init__() "
                                     "was called; call super().__init__() first")
            object.__setattr__(self, name, value)
            return
        params, buffers, modules = self._parameters, self._buffers, self._modules
        if isinstance(value, Parameter):
            self._forget(name, params)
            params[name] = value
        elif isinstance(value, Module):
            self._forget(name, modules)
            modules[name] = value
        elif name in params:
            if value is not None:
                raise TypeError(f"cannot assign {type(value).__name__} to parameter '{name}' of "
                                f"{type(self).__name__}: expected a Parameter or None")
            params[name] = None
        elif name in modules:
            if value is not None:
                raise TypeError(f"cannot assign {type(value).__name__} to submodule '{name}' of "
                                f"{type(self).__name__}: expected a Module or None")
            modules[name] = None
        elif name in buffers:
            if value is not None and not isinstance(value, Tensor):
                raise TypeError(f"cannot assign {type(value).__name__} to buffer '{name}' of "
                                f"{type(self).__name__}: expected a Tensor or None")
            buffers[name] = value
        else:
            object.__setattr__(self, name, value)

    def __getattr__(self, name):
        # called only when normal lookup fails: the registered state lives in the dicts
        d = self.__dict__
        for store in ("_parameters", "_buffers", "_modules"):
            if store in d and name in d[store]:
                return d[store][name]
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")

    def __delattr__(self, name):
        for store in (self._parameters, self._buffers, self._modules):
            if name in store:
                del store[name]
                self._non_persistent.discard(name)
                return
        object.__delattr__(self, name)

    def _forget(self, name, keep):
        """Drop `name` from the instance dict and every registry but `keep` (where it keeps its place)."""
        for store in (self._parameters, self._buffers, self._modules):
            if store is not keep:
                store.pop(name, None)
        self._non_persistent.discard(name)
        self.__dict__.pop(name, None)

    def register_parameter(self, name, param):
        """Register `param` (a Parameter, or None for an absent one such as bias=False)."""
        self._check_name(name)
        if param is not None and not isinstance(param, Parameter):
            raise TypeError(f"register_parameter('{name}'): expected a Parameter or None, got {type(param).__name__}")
        self._forget(name, self._parameters)
        self._parameters[name] = param

    def register_buffer(self, name, tensor, persistent=True):
        """Register non-trainable state (running statistics, masks); persistent ones go into state_dict."""
        self._check_name(name)
        if tensor is not None and not isinstance(tensor, Tensor):
            raise TypeError(f"register_buffer('{name}'): expected a Tensor or None, got {type(tensor).__name__}")
        self._forget(name, self._buffers)
        self._buffers[name] = tensor
        if not persistent:
            self._non_persistent.add(name)

    def add_module(self, name, module):
        self._check_name(name)
        if module is not None and not isinstance(module, Module):
            raise TypeError(f"add_module('{name}'): expected a Module or None, got {type(module).__name__}")
        self._forget(name, self._modules)
        self._modules[name] = module

    def _check_name(self, name):
        if "_parameters" not in self.__dict__:
            raise AttributeError("call super().__init__() before registering parameters, buffers or modules")
        if not isinstance(name, str) or not name or "." in name:
            raise KeyError(f"invalid name {name!r}: a non-empty string without '.'")

    # ---- traversal -------------------------------------------------------------------------
    def named_modules(self, memo=None, prefix=""):
        """(dotted name, module) for self and every descendant, pre-order, each module once."""
        memo = set() if memo is None else memo
        if id(self) in memo:
            return
        memo.add(id(self))
        yield prefix, self
        for name, child in self._modules.items():
            if child is not None:
                yield from child.named_modules(memo, f"{prefix}.{name}" if prefix else name)

    def modules(self):
        for _, m in self.named_modules():
            yield m

    def named_children(self):
        seen = set()
        for name, child in self._modules.items():
            if child is not None and id(child) not in seen:
                seen.add(id(child))
                yield name, child

    def children(self):
        for _, child in self.named_children():
            yield child

    def _named_members(self, store, prefix, recurse):
        seen = set()
        modules = self.named_modules(prefix=prefix) if recurse else [(prefix, self)]
        for mod_prefix, module in modules:
            for name, value in getattr(module, store).items():
                if value is None or id(value) in seen:
                    continue
                seen.add(id(value))
                yield (f"{mod_prefix}.{name}" if mod_prefix else name), value

    def named_parameters(self, prefix="", recurse=True):
        """(dotted name, Parameter) in registration order; a shared Parameter appears once."""
        return self._named_members("_parameters", prefix, recurse)

    def parameters(self, recurse=True):
        for _, p in self.named_parameters(recurse=recurse):
            yield p

    def named_buffers(self, prefix="", recurse=True):
        return self._named_members("_buffers", prefix, recurse)

    def buffers(self, recurse=True):
        for _, b in self.named_buffers(recurse=recurse):
            yield b

    # ---- state -----------------------------------------------------------------------------
    def state_dict(self, destination=None, prefix="", keep_vars=False):
        """OrderedDict of dotted name -> Tensor: per module its parameters, then its persistent
        buffers, then its children's entries (PyTorch's order and keys). The values are
        detached and share memory with the module's state unless keep_vars=True."""
        out = OrderedDict() if destination is None else destination
        for name, p in self._parameters.items():
            if p is not None:
                out[prefix + name] = p if keep_vars else p.detach()
        for name, b in self._buffers.items():
            if b is not None and name not in self._non_persistent:
                out[prefix + name] = b if keep_vars else b.detach()
        for name, child in self._modules.items():
            if child is not None:
                child.state_dict(out, prefix + name + ".", keep_vars)
        return out

    def load_state_dict(self, state_dict, strict=True):
        """Copy values (Tensors or NumPy/CuPy arrays) into the existing parameters and buffers, in place.

        The Parameter objects stay the same, so optimizers keep their references. Everything is
        checked before anything is copied: a shape mismatch is an error naming the key and both
        shapes; with strict=True, missing and unexpected keys are errors that list them.
        Returns IncompatibleKeys(missing_keys, unexpected_keys).
        """
        own = self.state_dict(keep_vars=True)
        missing = [k for k in own if k not in state_dict]
        unexpected = [k for k in state_dict if k not in own]
        errors = []
        for key, target in own.items():
            if key in state_dict:
                shape = tuple(getattr(state_dict[key], "shape", ()))
                if shape != target.shape:
                    errors.append(f"size mismatch for {key}: copying a value of shape {shape}, "
                                  f"the module's is {target.shape}")
        if strict:
            if missing:
                errors.append("missing key(s): " + ", ".join(repr(k) for k in missing))
            if unexpected:
                errors.append("unexpected key(s): " + ", ".join(repr(k) for k in unexpected))
        if errors:
            raise RuntimeError(f"Error(s) in loading state_dict for {type(self).__name__}:\n    "
                               + "\n    ".join(errors))
        with no_grad():
            for key, target in own.items():
                if key in state_dict:
                    target.copy_(_array_on(target.backend, state_dict[key]))
        return IncompatibleKeys(missing, unexpected)

    # ---- modes and housekeeping ------------------------------------------------------------
    def train(self, mode=True):
        for m in self.modules():
            object.__setattr__(m, "training", bool(mode))
        return self

    def eval(self):
        return self.train(False)

    def requires_grad_(self, requires_grad=True):
        for p in self.parameters():
            p.requires_grad_(requires_grad)
        return self

    def zero_grad(self, set_to_none=True):
        """Drop every parameter's gradient (or set it to zeros with set_to_none=False)."""
        for p in self.parameters():
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                p.grad = Tensor._wrap(p.grad.backend.xp.zeros_like(p.grad.data))

    def apply(self, fn):
        """Call fn(module) on every child (recursively) and then on self; returns self."""
        for child in self.children():
            child.apply(fn)
        fn(self)
        return self

    def to(self, device=None, dtype=None):
        """Move (and/or cast floating-point) parameters, their gradients and buffers in place; returns self.

        Parameters keep their identity, so build optimizers after or before this call alike.
        """
        backend = get_backend(device) if device is not None else None
        dtype = dtypes.as_dtype(dtype) if dtype is not None else None

        def convert(t):
            array = t.data
            if dtype is not None and dtypes.is_floating(array.dtype):
                array = array.astype(dtype, copy=False)
            if backend is not None and backend is not t.backend:
                array = backend.asarray(array) if backend.name != "cpu" else t.backend.to_numpy(array)
            if array is not t.data:
                t.data = array
                t.increment_version()

        for t in list(self.parameters()) + list(self.buffers()):
            convert(t)
            if t.grad is not None:
                convert(t.grad)
        return self

    def cpu(self):
        return self.to("cpu")

    def cuda(self):
        return self.to("cuda")

    def float(self):
        return self.to(dtype=dtypes.float32)

    def double(self):
        return self.to(dtype=dtypes.float64)

    # ---- printing --------------------------------------------------------------------------
    def extra_repr(self):
        """The text inside the parentheses of this module's line in repr (layer settings)."""
        return ""

    def __repr__(self):
        lines = []
        for name, child in self._modules.items():
            body = repr(child).replace("\n", "\n  ")
            lines.append(f"  ({name}): {body}")
        extra = self.extra_repr()
        if not lines:
            return f"{type(self).__name__}({extra})"
        head = f"{type(self).__name__}(" + (f"\n  {extra}" if extra else "")
        return head + "\n" + "\n".join(lines) + "\n)"

    def __dir__(self):
        return sorted(set(super().__dir__()) | set(self._parameters) | set(self._buffers) | set(self._modules))


def _array_on(backend, value):
    """`value` (a Tensor, a NumPy or CuPy array, or array-like) as an array on `backend`."""
    array = value.data if isinstance(value, Tensor) else value
    if type(array) is backend.array_type:
        return array
    try:
        array = backend_of_array(array).to_numpy(array)  # from another device through the host
    except TypeError:
        array = np.asarray(array)
    return backend.asarray(array)
