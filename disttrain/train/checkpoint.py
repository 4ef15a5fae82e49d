"""Job checkpoints: everything a training run needs to continue exactly where it stopped.

Layout of DIR/checkpoint/ (DIR is the run's output directory):

    model.safetensors   the model's state_dict, keys = parameter names; readable by torch:
                        torch.nn.Module.load_state_dict(safetensors.torch.load_file(...))
    state.safetensors   the other arrays: optimizer buffers ("optimizer.<param index>.<name>", e.g.
                        "optimizer.3.exp_avg") and the carried LSTM state ("hidden.h", "hidden.c")
    trainer.json        everything else, as JSON: "format_version", step, epoch, data cursor, optimizer
                        scalars and param_groups, LR-schedule states, RNG states, metrics position, the job

NOTE (atomicity): a checkpoint is first written completely into DIR/checkpoint.tmp-<step>/, every file and
the directory fsynced; then the previous DIR/checkpoint is renamed to DIR/checkpoint.prev, the new one renamed
to DIR/checkpoint (the directory fsynced after each rename), and only then is .prev deleted. A process killed
at any moment therefore leaves a complete checkpoint under DIR/checkpoint, or (killed between the two renames)
under DIR/checkpoint.prev; `find_checkpoint` looks in that order, and the next save removes the leftovers.
Only a complete directory is ever renamed to either name.
"""
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from disttrain.fsutil import fsync_path

__all__ = ["FORMAT_VERSION", "CheckpointError", "Checkpoint", "save_checkpoint", "load_checkpoint",
           "find_checkpoint", "remove_checkpoints", "split_optimizer_state", "join_optimizer_state"]

FORMAT_VERSION = 1
NAME = "checkpoint"
MODEL_FILE = "model.safetensors"
STATE_FILE = "state.safetensors"
META_FILE = "trainer.json"
FILES = (MODEL_FILE, STATE_FILE, META_FILE)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the path and what is wrong with it."""


@dataclass
class Checkpoint:
    path: Path        # the checkpoint directory it was read from
    model: dict       # name -> np.ndarray (the model's state_dict)
    arrays: dict      # name -> np.ndarray (optimizer buffers, hidden state)
    meta: dict        # the contents of trainer.json


# ------------------------------------------------------------------------------------------------- saving

def save_checkpoint(run_dir, model, arrays, meta):
    """Write a checkpoint into run_dir/checkpoint atomically (see the module NOTE); returns its path.

    model, arrays: {name: np.ndarray}; meta: a JSON-serialisable dict (gets "format_version").
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    final, prev = run_dir / NAME, run_dir / f"{NAME}.prev"
    for stale in run_dir.glob(f"{NAME}.tmp-*"):      # left by a process killed while writing
        shutil.rmtree(stale, ignore_errors=True)
    tmp = run_dir / f"{NAME}.tmp-{meta.get('step', 0)}"
    tmp.mkdir()
    meta = {"format_version": FORMAT_VERSION, **meta}
    header = {"format": "disttrain", "format_version": str(FORMAT_VERSION), "step": str(meta.get("step", 0))}
    save_file(_contiguous(model), tmp / MODEL_FILE, metadata=header)
    save_file(_contiguous(arrays), tmp / STATE_FILE, metadata=header)
    with open(tmp / META_FILE, "w", encoding="utf-8") as fh:
        json.dump(meta, fh, indent=1, default=_json_default, allow_nan=False)
        fh.write("\n")
    for name in FILES:
        fsync_path(tmp / name)
    fsync_path(tmp)
    if final.exists():
        if prev.exists():             # final is complete, so an old .prev is not needed any more
            shutil.rmtree(prev)
        os.rename(final, prev)
        fsync_path(run_dir)
    os.rename(tmp, final)
    fsync_path(run_dir)
    if prev.exists():
        shutil.rmtree(prev)
    return final


def remove_checkpoints(run_dir):
    """Delete run_dir's checkpoint, its .prev and any half-written temp directories."""
    run_dir = Path(run_dir)
    for path in [run_dir / NAME, run_dir / f"{NAME}.prev", *run_dir.glob(f"{NAME}.tmp-*")]:
        if path.exists():
            shutil.rmtree(path)


def _contiguous(arrays):
    return {name: np.ascontiguousarray(a) for name, a in arrays.items()}


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"cannot write {type(value).__name__} into {META_FILE}")


# ------------------------------------------------------------------------------------------------ loading

def find_checkpoint(path):
    """The checkpoint directory for `path`, or None: path itself if it holds trainer.json, else
    path/checkpoint, else path/checkpoint.prev (a run killed between the two renames of a save)."""
    path = Path(path)
    candidates = [path, path / NAME, path / f"{NAME}.prev"]
    if path.name == NAME:
        candidates.append(path.with_name(f"{NAME}.prev"))
    for candidate in candidates:
        if (candidate / META_FILE).is_file():
            return candidate
    return None


def load_checkpoint(path):
    """Read the checkpoint at `path` (a run directory or a checkpoint directory) and validate it.

    Raises CheckpointError naming the path and what is missing or wrong.
    """
    found = find_checkpoint(path)
    if found is None:
        raise CheckpointError(f"no checkpoint in {path}: expected {Path(path) / NAME / META_FILE} "
                              f"(or {META_FILE} directly in {path})")
    meta_path = found / META_FILE
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{meta_path}: unreadable ({exc})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{meta_path}: expected a JSON object, found {type(meta).__name__}")
    version = meta.get("format_version")
    if version is None:
        raise CheckpointError(f'{meta_path}: no "format_version" field; not a disttrain job checkpoint')
    if version != FORMAT_VERSION:
        raise CheckpointError(f'{meta_path}: "format_version" is {version!r}, this disttrain reads version '
                              f"{FORMAT_VERSION}")
    missing = [key for key in ("step", "epoch", "data", "optimizer", "schedules", "rng", "metrics", "job")
               if key not in meta]
    if missing:
        raise CheckpointError(f"{meta_path}: missing field(s) {', '.join(missing)}")
    return Checkpoint(found, _load_arrays(found / MODEL_FILE), _load_arrays(found / STATE_FILE), meta)


def _load_arrays(path):
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; the checkpoint directory {path.parent} is incomplete")
    try:
        loaded = load_file(path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
    return {name: np.array(a) for name, a in loaded.items()}     # copies: no views of a mapped file


# ------------------------------------------------------------------------------------ optimizer state split

def split_optimizer_state(state_dict, prefix="optimizer."):
    """An Optimizer.state_dict() -> (arrays for safetensors, the JSON rest).

    Arrays become "<prefix><param index>.<name>"; numbers stay in the JSON part under the same index.
    """
    arrays, scalars = {}, {}
    for index, entry in state_dict["state"].items():
        for name, value in entry.items():
            if hasattr(value, "shape"):
                arrays[f"{prefix}{index}.{name}"] = value
            else:
                scalars.setdefault(str(index), {})[name] = value
    return arrays, {"state": scalars, "param_groups": state_dict["param_groups"]}


def join_optimizer_state(arrays, saved, prefix="optimizer."):
    """The inverse of split_optimizer_state: an Optimizer.state_dict() again (JSON lists become tuples)."""
    state = {}
    for index, entry in saved["state"].items():
        state[int(index)] = dict(entry)
    for key, value in arrays.items():
        if not key.startswith(prefix):
            continue
        index, _, name = key[len(prefix):].partition(".")
        state.setdefault(int(index), {})[name] = value
    groups = [{k: (tuple(v) if isinstance(v, list) and k != "params" else v) for k, v in group.items()}
              for group in saved["param_groups"]]
    return {"state": state, "param_groups": groups}
