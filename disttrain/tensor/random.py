"""Random number generators, one per backend, seeded together by manual_seed.

The CPU draws with a NumPy Generator (PCG64). Other backends (the GPU) draw with a CounterGenerator:
sample i of a call is a hash of (seed, offset + i) computed by the backend's `counter_uniform`
kernel, so its whole state is two integers and any sample can be recomputed on its own.

Their states can be saved and restored (`get_rng_state` / `set_rng_state`) as plain data, one entry
per backend name: activation checkpointing replays dropout masks with them and job checkpoints
(JSON) resume with them.

A training step of several processes draws from `step_stream(stream)`: the step's numbers (dropout masks)
from generators seeded by one number drawn from the shared generators and the process's stream, so data
shares, pipeline stages and parameter-server workers draw different masks, while the shared generators
advance alike on every process (a job checkpoint's state resumes every one of them).
"""
import contextlib

import numpy as np

from disttrain.tensor import backend as _backend

_generators = {}  # backend name -> live generator
_pending = {}     # backend name -> state set_rng_state restored for a generator not created yet
_seed = 0


class CounterGenerator:
    """Uniform [0, 1) numbers on a non-CPU backend from a stateless hash (kernels_numpy.counter_uniform:
    SplitMix64 of seed and counter). `state` = {"seed": int, "offset": int}; each call advances the
    offset by the number of samples it drew, so drawing n then m gives the same numbers as n + m."""

    def __init__(self, backend, seed, offset=0):
        self.backend = backend
        self.seed = int(seed)
        self.offset = int(offset)

    def random(self, shape, dtype=np.float64):
        """An array of `shape` (int or tuple) on the backend, float32 or float64 uniform in [0, 1)."""
        shape = (int(shape),) if np.ndim(shape) == 0 else tuple(shape)
        out = self.backend.kernels.counter_uniform(self.backend.xp, shape, dtype, self.seed, self.offset)
        self.offset += out.size
        return out

    @property
    def state(self):
        return {"seed": self.seed, "offset": self.offset}

    @state.setter
    def state(self, state):
        self.seed, self.offset = _check_counter_state(state, self.backend.name)

    def __repr__(self):
        return f"CounterGenerator({self.backend.name}, seed={self.seed}, offset={self.offset})"


def _check_counter_state(state, name):
    """(seed, offset) of a saved CounterGenerator state, or a ValueError naming the backend."""
    if (not isinstance(state, dict) or set(state) != {"seed", "offset"}
            or not all(isinstance(state[k], (int, np.integer)) for k in state) or state["offset"] < 0):
        raise ValueError(f"rng state of backend {name!r} must be {{'seed': int, 'offset': int >= 0}}, got {state!r}")
    return int(state["seed"]), int(state["offset"])


def generator(backend):
    """The generator that draws on `backend`'s arrays: a NumPy Generator on the CPU, a CounterGenerator
    elsewhere. Created on first use from the seed, or from the state set_rng_state left pending."""
    gen = _generators.get(backend.name)
    if gen is None:
        gen = _make(backend, _seed)
        if backend.name in _pending:
            _set_state(gen, backend.name, _pending.pop(backend.name))
        _generators[backend.name] = gen
    return gen


def _make(backend, seed):
    if backend.name == "cpu":
        return np.random.Generator(np.random.PCG64(seed))
    return CounterGenerator(backend, seed)  # the same seed: a different algorithm, so unrelated numbers


def _get_state(gen, name):
    return gen.bit_generator.state if name == "cpu" else gen.state


def _set_state(gen, name, state):
    if name == "cpu":
        gen.bit_generator.state = state
    else:
        gen.state = state


def manual_seed(seed):
    """Seed every backend's generator (those not yet created are seeded on first use)."""
    global _seed
    _seed = int(seed)
    _generators.clear()
    _pending.clear()


def get_rng_state():
    """A plain-data snapshot of every generator's state: {"seed": ..., backend name: state, ...}.

    Generators not created yet are left out (they start from the seed), except those with a state
    restored by set_rng_state and not used since: that state is carried over.
    """
    state = {"seed": _seed, **_pending}
    for name, gen in _generators.items():
        state[name] = _get_state(gen, name)
    return state


def set_rng_state(state):
    """Restore a get_rng_state() snapshot. A backend's state is applied now if it is the CPU's, else when
    that backend's generator is first created; backends missing from it start from its seed. Old
    snapshots holding only "seed" and "cpu" load as they always did."""
    global _seed
    if not isinstance(state, dict) or "seed" not in state:
        raise ValueError(f"set_rng_state: expected a get_rng_state() snapshot with a 'seed', got {state!r}")
    for name, saved in state.items():
        if name not in ("seed", "cpu"):
            _check_counter_state(saved, name)
    cpu = None
    if "cpu" in state:  # applied now, so a bad CPU state fails before anything changed
        cpu = _make(_backend.CPU, int(state["seed"]))
        _set_state(cpu, "cpu", state["cpu"])
    _seed = int(state["seed"])
    _generators.clear()
    _pending.clear()
    _pending.update((name, saved) for name, saved in state.items() if name not in ("seed", "cpu"))
    if cpu is not None:
        _generators["cpu"] = cpu


@contextlib.contextmanager
def fork_rng(state):
    """Inside the block the generators start from `state` (a get_rng_state() snapshot); on exit the
    generators that were in use carry on exactly where they were, whatever the block drew.

    Activation checkpointing replays a segment's dropout masks with this, on every backend: the
    snapshot holds the CPU generator's state and the device generators' (seed, offset).
    """
    global _seed
    live, pending, live_seed = dict(_generators), dict(_pending), _seed
    try:
        set_rng_state(state)  # new generator objects: the live ones are not touched
        yield
    finally:
        _generators.clear()
        _generators.update(live)
        _pending.clear()
        _pending.update(pending)
        _seed = live_seed


@contextlib.contextmanager
def step_stream(stream):
    """Inside the block the generators draw from a stream of their own, seeded by a number drawn now from the
    CPU generator and by `stream` (an int >= 0: which process of a job this is); on exit they carry on after
    that one draw, whatever the block drew."""
    key = int(generator(_backend.CPU).integers(1 << 63))
    seed = int(np.random.SeedSequence([key, int(stream)]).generate_state(1, np.uint64)[0] >> 1)
    with fork_rng({"seed": seed}):
        yield
