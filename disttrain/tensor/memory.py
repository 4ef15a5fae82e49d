"""Memory meter: live and peak bytes of the arrays that tensors and graph nodes hold.

    with MemoryMeter() as m:          # or MemoryMeter("cuda")
        loss = model(x).sum()
        loss.backward()
    m.peak_bytes - m.start_bytes      # the most memory the step needed on top of what it started with

Host (NumPy) arrays are counted by the engine itself, only while a meter is active: every array
that becomes a tensor's data (op outputs, gradients, masks, created tensors) and every array a
recorded node keeps for backward (ReLU masks, LSTM gate activations, softmax probabilities) is
counted once, by the array that owns the memory (a view counts its base), and uncounted by a weak
reference callback the moment it is freed. On entry, the arrays of all tensors alive are counted
too, so figures are absolute and a view of a parameter (w.T) costs nothing. Those are the
`resident` tensors the caller names (the Trainer: parameters, gradients, carried state) or, when it
names none, every tensor a scan of the garbage collector's objects finds after a collection; the scan's
cost grows with the number of Python objects alive (see _count_existing_tensors). Tensors in reference cycles
count until the cycle collector runs. Temporaries that an op frees before returning are not seen,
so the peak is that of memory held between ops (a lower bound on the process's peak).

GPU (CuPy) figures come from CuPy's default memory pool: used_bytes() now, its maximum sampled
whenever the engine makes or keeps an array while a meter is active, and total_bytes() (held by
the pool, used or not) as `reserved_bytes`.

NOTE: with no meter active, Tensor._wrap and Tensor.__init__ pay one attribute check per array
(`hook.active`); counting costs about a microsecond per array only while a meter is active. The
arrays a node keeps come from an op observer (disttrain.autograd.observe) that the first meter to
start registers and the last to stop removes: this layer reaches up to autograd only then.
"""
import gc
import itertools
import weakref

import numpy as np


class _Hook:
    """The flag the hot path reads: True while at least one meter is active."""

    active = False


hook = _Hook()

_live = 0          # bytes of counted host arrays alive now
_refs = {}         # id(owner array) -> _Ref; the ref's callback uncounts the array when it is freed
_meters = []       # active meters


class _Ref(weakref.ref):
    __slots__ = ("key", "nbytes")


def _released(ref):
    global _live
    if _refs.get(ref.key) is ref:  # not cleared (tracking stopped) or replaced meanwhile
        del _refs[ref.key]
        _live -= ref.nbytes


def track(array):
    """Count `array` (called by the engine only while hook.active)."""
    global _live
    if not isinstance(array, np.ndarray):
        if hasattr(array, "__cuda_array_interface__"):
            _sample_device()
        return
    while array.base is not None:  # a view holds its base alive: count the base, once
        base = array.base
        if type(base) is not np.ndarray:
            base = getattr(base, "base", None)  # as_strided wraps the array in a DummyArray
            if type(base) is not np.ndarray:
                break
        array = base
    key = id(array)
    if key in _refs:
        return
    ref = _Ref(array, _released)
    ref.key, ref.nbytes = key, array.nbytes
    _refs[key] = ref
    _live += ref.nbytes
    for m in _meters:
        if _live > m._peak_host:
            m._peak_host = _live


def count(array):
    """Count `array`, which no tensor holds (a communication buffer), while a meter runs: it counts until it is
    freed. A no-op when no meter runs."""
    if hook.active:
        track(array)


def track_node(node):
    """Count the arrays a recorded node keeps on itself for backward (masks, activations)."""
    for value in vars(node).values():
        if isinstance(value, np.ndarray) or hasattr(value, "__cuda_array_interface__"):
            track(value)


def _count_recorded_node(call):
    """The op observer active meters share: what each recorded node keeps for backward."""
    if call.node is not None:
        track_node(call.node)


_node_observer = None  # its handle while a meter runs


def _sample_device():
    used = _cuda_pool().used_bytes()
    for m in _meters:
        if used > m._peak_device:
            m._peak_device = used


def _cuda_pool():
    import cupy

    return cupy.get_default_memory_pool()


def _count_existing_tensors():
    from disttrain.tensor.tensor import Tensor

    # Garbage in reference cycles first: a tensor no one can reach would count as held at start and, freed
    # when the collector next runs inside the metered code, lower the figure by its size.
    gc.collect()

    # NOTE: the filter runs in C (compress over map): a Python loop with issubclass over every object of a
    # Trainer process costs twice as much. type(obj), not isinstance: that reads obj.__class__, which some
    # objects warn on.
    objects = gc.get_objects()
    for tensor in itertools.compress(objects, map(_subclasses(Tensor).__contains__, map(type, objects))):
        track(tensor.data)


def _subclasses(cls):
    """cls and every subclass of it defined so far."""
    found, todo = {cls}, [cls]
    while todo:
        for sub in todo.pop().__subclasses__():
            if sub not in found:
                found.add(sub)
                todo.append(sub)
    return found


class MemoryMeter:
    """Live and peak bytes of array memory on one device ("cpu": NumPy, "cuda": CuPy's pool).

    Usable as a context manager or with start()/stop(); meters may nest. All figures are
    absolute (every tensor's arrays, parameters included); `start_bytes` is the live figure at
    start() or at the last reset(), so `peak_bytes - start_bytes` is what the metered code
    needed on top. After stop() the figures stay frozen.

    resident: the tensors alive at start that the metered code may use (a training step: parameters,
    gradients, the carried state), counted instead of scanning every Python object for tensors; a
    tensor alive but left out would count as new if the code made a view of it. buffers: arrays alive at start
    that no tensor holds (a mode's communication buffers), counted as resident too.
    """

    def __init__(self, device="cpu", resident=None, buffers=()):
        name = device.split(":")[0] if isinstance(device, str) else device
        if name not in ("cpu", "cuda"):
            raise ValueError(f"MemoryMeter: unknown device {device!r}; expected 'cpu' or 'cuda'")
        self.device = name
        self._resident = resident
        self._buffers = buffers
        self.running = False
        self._peak_host = self._peak_device = 0
        self._start = self._final = 0

    def start(self):
        global _node_observer
        if self.running:
            raise RuntimeError("MemoryMeter.start(): this meter is already running")
        resident, self._resident = self._resident, None  # holding them would keep freed gradients alive
        buffers, self._buffers = self._buffers, ()
        if not _meters:
            from disttrain.autograd.observe import add_op_observer

            if resident is None:
                _count_existing_tensors()
            else:
                for tensor in resident:
                    track(tensor.data)
            for array in buffers:
                track(array)
            hook.active = True
            _node_observer = add_op_observer(_count_recorded_node)
        _meters.append(self)
        self.running = True
        self._start = self._now()
        self._peak_host = _live
        self._peak_device = self._start if self.device == "cuda" else 0
        return self

    def stop(self):
        if not self.running:
            return self
        self._final = self._now()
        _meters.remove(self)
        self.running = False
        if not _meters:  # nobody is counting: forget every array, callbacks included
            global _live, _node_observer
            hook.active = False
            _node_observer.remove()
            _node_observer = None
            _refs.clear()
            _live = 0
        return self

    def reset(self):
        """Peak := live now; start_bytes := live now."""
        now = self._now() if self.running else self._final
        self._start = now
        if self.device == "cpu":
            self._peak_host = now
        else:
            self._peak_device = now
        return self

    def _now(self):
        return _live if self.device == "cpu" else _cuda_pool().used_bytes()

    @property
    def live_bytes(self):
        return self._now() if self.running else self._final

    @property
    def peak_bytes(self):
        peak = self._peak_host if self.device == "cpu" else self._peak_device
        return max(peak, self.live_bytes)

    @property
    def start_bytes(self):
        return self._start

    @property
    def reserved_bytes(self):
        """Bytes the CuPy pool holds (used or cached); equal to live_bytes on the CPU."""
        return _cuda_pool().total_bytes() if self.device == "cuda" else self.live_bytes

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        return False

    def __repr__(self):
        state = "running" if self.running else "stopped"
        return (f"MemoryMeter({self.device!r}, {state}, live={self.live_bytes} B, peak={self.peak_bytes} B, "
                f"start={self.start_bytes} B)")


# ---- the process-wide meter a training loop logs ----------------------------------------------
_process_meter = None


def enable(device="cpu"):
    """Start the process-wide meter (idempotent); peak_bytes() / reset_peak() then report it."""
    global _process_meter
    if _process_meter is None or not _process_meter.running:
        _process_meter = MemoryMeter(device).start()
    return _process_meter


def disable():
    if _process_meter is not None:
        _process_meter.stop()


def is_enabled():
    return _process_meter is not None and _process_meter.running


def _meter():
    if _process_meter is None or not _process_meter.running:
        raise RuntimeError("memory metering is off: call disttrain.checkpointing.memory.enable() first")
    return _process_meter


def live_bytes():
    return _meter().live_bytes


def peak_bytes():
    """Peak live bytes since enable() or the last reset_peak() (absolute: parameters included)."""
    return _meter().peak_bytes


def reset_peak():
    _meter().reset()
