"""Undo of one optimizer update: what a server puts back when an update's result is refused.

    undo = Rollback()
    undo.save(params, optimizer)        # before optimizer.step(): copies of the parts and their optimizer state
    optimizer.step()
    if not all finite: undo.restore()   # the parts and their state exactly as they were, bit for bit

Copies go into buffers kept from one update to the next (one per array), so an update costs one extra copy of
what it touches and no allocation. State entries the step created (a first step's momentum buffer, Adam's
moments and step count) are removed again by restore().
"""
import numpy as np

__all__ = ["Rollback"]


class Rollback:
    def __init__(self):
        self._buffers = {}            # (id of the parameter, state entry name or None for its data) -> spare
        self._optimizer = None
        self._saved = []              # (param, its data array, copy, {state name: (value, copy or None)})

    def save(self, params, optimizer):
        """Remember `params` (Parameters) and optimizer.state of each, until the next save()."""
        self._optimizer, self._saved = optimizer, []
        for p in params:
            state = optimizer.state.get(p, {})
            entries = {name: (value, self._copy((id(p), name), value)) for name, value in state.items()}
            self._saved.append((p, p.data, self._copy((id(p), None), p.data), entries))

    def restore(self):
        """Put back what save() remembered: each param's data and optimizer state as they were."""
        for p, data, copy, entries in self._saved:
            np.copyto(data, copy)
            p.data = data
            state = self._optimizer.state[p]
            for name in [n for n in state if n not in entries]:
                del state[name]
            for name, (value, saved) in entries.items():
                if saved is not None:
                    np.copyto(value, saved)
                state[name] = value
            if not state:
                del self._optimizer.state[p]
        self._saved = []

    def _copy(self, key, value):
        """A copy of an array, in a buffer reused from earlier saves; None for anything else (ints, floats)."""
        if not isinstance(value, np.ndarray):
            return None
        buf = self._buffers.get(key)
        if buf is None or buf.shape != value.shape or buf.dtype != value.dtype:
            buf = self._buffers[key] = np.empty_like(value)
        np.copyto(buf, value)
        return buf
