"""Random number generators, one per backend, seeded together by manual_seed.

Their states can be saved and restored (`get_rng_state` / `set_rng_state`): activation
checkpointing replays dropout masks with them and job checkpoints resume with them.
"""
import contextlib

import numpy as np

from disttrain.tensor import backend as _backend

_generators = {}
_seed = 0


def generator(backend):
    """The generator that draws on `backend`'s arrays (NumPy Generator, or CuPy's on the GPU)."""
    gen = _generators.get(backend.name)
    if gen is None:
        gen = _make(backend, _seed)
        _generators[backend.name] = gen
    return gen


def _make(backend, seed):
    if backend.name == "cpu":
        return np.random.Generator(np.random.PCG64(seed))
    return backend.xp.random.default_rng(seed)


def manual_seed(seed):
    """Seed every backend's generator (those not yet created are seeded on first use)."""
    global _seed
    _seed = int(seed)
    _generators.clear()


def get_rng_state():
    """A plain-data snapshot of all generators' states."""
    state = {"seed": _seed}
    for name, gen in _generators.items():
        if name == "cpu":
            state[name] = gen.bit_generator.state
    return state


def set_rng_state(state):
    global _seed
    _seed = state["seed"]
    _generators.clear()
    if "cpu" in state:
        gen = _make(_backend.CPU, _seed)
        gen.bit_generator.state = state["cpu"]
        _generators["cpu"] = gen


@contextlib.contextmanager
def fork_rng(state):
    """Inside the block the generators start from `state` (a get_rng_state() snapshot); on exit the
    generators that were in use carry on exactly where they were, whatever the block drew.

    Activation checkpointing replays a segment's dropout masks with this.
    NOTE: get_rng_state() holds the CPU generator only, so a CUDA generator inside the block
    restarts from the seed; the live one is still restored untouched on exit.
    """
    global _seed
    live, live_seed = dict(_generators), _seed
    set_rng_state(state)
    try:
        yield
    finally:
        _generators.clear()
        _generators.update(live)
        _seed = live_seed
