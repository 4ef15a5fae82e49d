"""Optimizer: the base every update rule sits on (param groups, per-parameter state, save/resume).

Shaped like torch.optim.Optimizer so that training code and checkpoints read the same way:
  param_groups  a list of dicts, each with 'params' (a list of Tensors) and that group's
                hyper-parameters; keys a group leaves out come from the optimizer's `defaults`
  state         per-parameter dict keyed by the parameter Tensor, filled at its first update:
                buffers are backend arrays (NumPy or CuPy, like the parameter), counters plain ints
A subclass implements `_validate(group)` and `_update(param, grad, state, group)` (and, for memory estimates,
`state_buffers(group)`: its parameter-shaped state arrays per parameter); the base walks
the groups, skips parameters whose grad is None and runs every update under no_grad. A subclass whose
backends update many parameters in one call (multi-tensor kernels) overrides
`_update_group(params, grads, states, group)` instead, which gets a group's parameters that have a gradient
(the default runs `_update` on each). A subclass that
steps otherwise (a wrapper distributing another optimizer's work) overrides `_step(closure)` and
`_zero_grad(set_to_none)`, what step() and zero_grad() run after their hooks.

Hooks (for the layers that wrap an optimizer, e.g. data parallelism refusing to step or clear gradients
that are still being averaged): `register_step_pre_hook(hook)`, hook(optimizer, args, kwargs) as in torch,
and `register_zero_grad_pre_hook(hook)`, hook(optimizer); each runs before the call and may raise to
refuse it; each returns a handle whose remove() unregisters the hook.

NOTE: updates change `param.data` in place through Tensor's in-place methods (add_, mul_), which
bump `param._version`; a backward through a graph recorded before the step then fails loudly
instead of silently using the new values.
NOTE: array buffers in `state` are parameter-shaped and of the parameter's dtype;
`load_state_dict` relies on that to check shapes and to cast buffers onto each parameter.
"""
import copy
from collections import defaultdict

from disttrain.autograd.grad_mode import enable_grad, no_grad
from disttrain.autograd.hooks import RemovableHandle
from disttrain.tensor.backend import backend_of_array
from disttrain.tensor.tensor import Tensor


class Optimizer:
    """Base class. `params`: an iterable of Tensors, or of dicts {'params': [...], hyper: value}."""

    def __init__(self, params, defaults):
        self.defaults = dict(defaults)
        self.state = defaultdict(dict)
        self.param_groups = []
        self._step_pre_hooks = []
        self._zero_grad_pre_hooks = []
        if isinstance(params, Tensor):
            raise TypeError("params must be an iterable of Tensors or of dicts, got a single Tensor; "
                            "pass [tensor] instead")
        groups = list(params)
        if not groups:
            raise ValueError(f"{type(self).__name__} got an empty parameter list")
        if not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        for group in groups:
            self.add_param_group(group)

    # ---- subclass API ----------------------------------------------------------------------
    def _validate(self, group):
        """Raise ValueError naming any bad hyper-parameter of `group`."""

    def _update(self, param, grad, state, group):
        """Update `param` in place from `grad` (its gradient's backend array, never to be modified)."""
        raise NotImplementedError

    def _update_group(self, params, grads, states, group):
        """Update the `params` of `group` that have a gradient (in the group's order) in place, from `grads`
        (their gradients' backend arrays, never to be modified) and `states` (their state dicts). The
        default updates them one by one with `_update`."""
        for param, grad, state in zip(params, grads, states):
            self._update(param, grad, state, group)

    def state_buffers(self, group):
        """How many parameter-shaped arrays of state each parameter of `group` gets at its first update (what a
        memory estimate counts before any step); None when this optimizer does not say."""
        return None

    # ---- groups ----------------------------------------------------------------------------
    def add_param_group(self, group):
        """Add a group of parameters with its own hyper-parameters (missing ones from `defaults`)."""
        if not isinstance(group, dict):
            raise TypeError(f"a param group must be a dict, got {type(group).__name__}")
        if "params" not in group:
            raise ValueError(f"param group {len(self.param_groups)} has no 'params' entry")
        group = dict(group)
        group["params"] = self._check_params(group["params"])
        for key, value in self.defaults.items():
            group.setdefault(key, value)
        self._validate(group)
        self.param_groups.append(group)

    def _check_params(self, params):
        where = f"param group {len(self.param_groups)}"
        if isinstance(params, Tensor):
            params = [params]
        elif isinstance(params, (set, frozenset)):
            # state_dict numbers parameters by position, so their order must be stable across runs
            raise TypeError(f"{where}: params must be an ordered sequence, got a set")
        params = list(params)
        for i, p in enumerate(params):
            if not isinstance(p, Tensor):
                raise TypeError(f"{where}: params[{i}] is a {type(p).__name__}, not a Tensor")
            if not p.is_leaf:
                raise ValueError(f"{where}: params[{i}] (shape {p.shape}) is the result of an op, not a leaf; "
                                 "optimize the leaf tensors it was computed from")
        ids = {id(p) for p in params}
        if len(ids) != len(params):
            raise ValueError(f"{where}: a parameter is listed twice (it would be updated twice per step)")
        if any(id(p) in ids for p in self._params()):
            raise ValueError(f"{where}: some parameters already belong to an earlier param group")
        return params

    def _params(self):
        return [p for group in self.param_groups for p in group["params"]]

    # ---- hooks -----------------------------------------------------------------------------
    def register_step_pre_hook(self, hook):
        """hook(optimizer, args, kwargs) before every step(): it may raise to refuse the step, or return
        (args, kwargs) to replace step's arguments (torch's signature). Returns a handle with remove()."""
        self._step_pre_hooks.append(hook)
        return RemovableHandle(self._step_pre_hooks, hook)

    def register_zero_grad_pre_hook(self, hook):
        """hook(optimizer) before every zero_grad(); it may raise to refuse clearing the gradients (e.g. while
        a communicator is still reading them). Returns a handle with remove()."""
        self._zero_grad_pre_hooks.append(hook)
        return RemovableHandle(self._zero_grad_pre_hooks, hook)

    # ---- the training-loop calls -----------------------------------------------------------
    def zero_grad(self, set_to_none=True):
        """Clear every parameter's gradient: drop it (default) or fill it with zeros.

        set_to_none=False keeps the gradient arrays (useful when a communicator holds views of them).
        The zero_grad pre-hooks run first (see register_zero_grad_pre_hook).
        """
        for hook in list(self._zero_grad_pre_hooks):
            hook(self)
        self._zero_grad(set_to_none)

    def _zero_grad(self, set_to_none):
        for p in self._params():
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            elif p.grad.requires_grad:
                # a gradient made with create_graph=True belongs to a graph: zeroing it in place
                # would corrupt that graph, so give the parameter a fresh zero gradient instead
                p.grad = Tensor(p.grad.backend.xp.zeros_like(p.grad.data))
            else:
                p.grad.zero_()

    def step(self, closure=None):
        """One update of every parameter that has a gradient. `closure` re-evaluates the loss.
        The step pre-hooks run first (see register_step_pre_hook)."""
        args, kwargs = (closure,), {}
        for hook in list(self._step_pre_hooks):
            changed = hook(self, args, kwargs)
            if changed is not None:
                args, kwargs = changed
        return self._step(*args, **kwargs)

    def _step(self, closure=None):
        loss = None
        if closure is not None:
            with enable_grad():
                loss = closure()
        with no_grad():
            for group in self.param_groups:
                params = [p for p in group["params"] if p.grad is not None]
                if params:
                    grads = [_grad_array(p) for p in params]  # every gradient checked before any update
                    self._update_group(params, grads, [self.state[p] for p in params], group)
        return loss

    def state_nbytes(self):
        """Bytes of the arrays in this optimizer's state now."""
        return sum(v.nbytes for entry in self.state.values() for v in entry.values() if hasattr(v, "nbytes"))

    # ---- save / resume ---------------------------------------------------------------------
    def state_dict(self):
        """A snapshot in torch's layout, with parameters named by position across all groups:

        {'state': {index: {name: NumPy array | number}},
         'param_groups': [{hyper: value, ..., 'params': [index, ...]}]}
        """
        groups, state, index = [], {}, 0
        for group in self.param_groups:
            saved = {k: copy.deepcopy(v) for k, v in group.items() if k != "params"}
            saved["params"] = list(range(index, index + len(group["params"])))
            groups.append(saved)
            for p in group["params"]:
                entry = self.state.get(p)
                if entry:
                    state[index] = {k: _to_host(v) for k, v in entry.items()}
                index += 1
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict):
        """Restore a `state_dict()` snapshot: hyper-parameters per group and every parameter's state.

        The groups must match this optimizer's in number and size (the parameters themselves are
        this optimizer's; only their positions are saved). Buffers are copied onto each parameter's
        device and dtype. Nothing changes unless the whole snapshot fits.
        """
        saved_groups = state_dict["param_groups"]
        self._check_layout(saved_groups)
        by_index = {}
        for group, saved in zip(self.param_groups, saved_groups):
            by_index.update(zip(saved["params"], group["params"]))
        state = defaultdict(dict)
        for index, entry in state_dict["state"].items():
            if index not in by_index:
                raise ValueError(f"loaded state dict has state for parameter index {index}, "
                                 f"which none of its param groups lists")
            param = by_index[index]
            state[param] = {k: _to_param(v, param, index, k) for k, v in entry.items()}
        self.param_groups = [{**copy.deepcopy({k: v for k, v in saved.items() if k != "params"}),
                              "params": group["params"]}
                             for group, saved in zip(self.param_groups, saved_groups)]
        self.state = state

    def _check_layout(self, saved_groups):
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"loaded state dict has {len(saved_groups)} param groups, "
                             f"this optimizer has {len(self.param_groups)}")
        for i, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"param group {i}: loaded state dict has {len(saved['params'])} parameters, "
                                 f"this optimizer's group has {len(group['params'])}")
            missing = sorted(set(self.defaults) - set(saved))
            if missing:
                raise ValueError(f"param group {i}: loaded state dict lacks hyper-parameters {missing} of "
                                 f"{type(self).__name__}; was it saved from another kind of optimizer?")

    def __repr__(self):
        lines = [f"{type(self).__name__} ("]
        for i, group in enumerate(self.param_groups):
            hypers = ", ".join(f"{k}={v}" for k, v in group.items() if k != "params")
            lines.append(f"  group {i}: {len(group['params'])} params, {hypers}")
        return "\n".join(lines) + "\n)"


def _grad_array(param):
    """The gradient's array, checked against the parameter (a mismatch would broadcast silently)."""
    grad = param.grad.data
    if type(grad) is not type(param.data):
        raise RuntimeError(f"parameter of shape {param.shape} is on {param.device}, "
                           f"its gradient on {param.grad.device}")
    if grad.shape != param.data.shape:
        raise RuntimeError(f"parameter of shape {param.shape} has a gradient of shape {grad.shape}")
    return grad


def _to_host(value):
    """A state value as it goes into a state_dict: arrays as NumPy copies, numbers as they are."""
    if not hasattr(value, "shape"):
        return copy.deepcopy(value)
    host = backend_of_array(value).to_numpy(value)
    # on the CPU to_numpy returns the live buffer itself; the snapshot must not change with it
    return host.copy() if host is value else host


def _to_param(value, param, index, name):
    """A state_dict value as it goes back into `state`: arrays onto the parameter's device and dtype."""
    if not hasattr(value, "shape"):
        return copy.deepcopy(value)
    if tuple(value.shape) != param.shape:
        raise ValueError(f"loaded state '{name}' of parameter {index} has shape {tuple(value.shape)}, "
                         f"the parameter has shape {param.shape}")
    # astype copies, so the loaded optimizer never shares memory with the caller's state dict
    return param.backend.asarray(value.astype(param.dtype))
