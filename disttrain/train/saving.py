"""Saving and restoring a training run: job checkpoints (kept, verified, pruned), everything a run needs to
continue exactly where it stopped.

A run directory DIR keeps its checkpoints in DIR/checkpoints/, one directory per saved step:

    step-000120/            a complete checkpoint of step 120:
        model.safetensors   the model's state_dict, keys = parameter names; readable by torch:
                            torch.nn.Module.load_state_dict(safetensors.torch.load_file(...))
        state.safetensors   the other arrays: optimizer buffers ("optimizer.<param index>.<name>", e.g.
                            "optimizer.3.exp_avg") and the model's carried state ("state.0", "state.1", ...:
                            the LSTM LM's h and c; disttrain.models.protocol.state_to_arrays)
        trainer.json        everything else, as JSON: "format_version", step, epoch, data cursor, optimizer
                            scalars and param_groups, LR-schedule states, RNG states, metrics position, the job,
                            the mode's record ("mode": a parameter-server worker's says what each server had
                            reached)
        manifest.json       written last: "format_version", "step", "valid_loss" (the validation loss of these
                            weights when they were evaluated at this step, else null) and, for each of the three
                            files above, its size in bytes and its sha256
    step-000180/            the newest `keep` steps stay, and with keep_best also the lowest valid_loss
    step-000240.tmp/        a checkpoint being written
    step-000180.prev/       only while step 180 is written a second time (e.g. a finished run resumed): the
                            first copy, deleted once the second is in place

NOTE (atomicity): a checkpoint is written completely into step-N.tmp/ (each file fsynced as it is written, then
the directory), and only then renamed to step-N (the parent fsynced after each rename). A process killed at any
moment therefore leaves complete checkpoints under their step names and at most a half-written .tmp directory,
which no reader looks at and the next save deletes; a save that fails with an exception deletes its own .tmp.
Re-saving an existing step renames the old copy to step-N.prev first; readers take a .prev when its step-N is
missing (killed between the two renames).

NOTE (verification): load_checkpoint recomputes every file's sha256 and compares it, and the size, with the
manifest, so a damaged file (a bad disk block, a copy cut short, a stray write) is reported by name instead of
being trained on. Given a run directory it takes the newest checkpoint that verifies and says, in `skipped`, which
newer ones it passed over and why.

NOTE (finite values): save_checkpoint refuses arrays or JSON numbers that are NaN or infinite, so a checkpoint on
disk is always one a run can continue from.
"""
import hashlib
import json
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from disttrain.fsutil import fsync_path, naming

__all__ = ["FORMAT_VERSION", "CheckpointError", "RunExistsError", "NonFiniteCheckpointError", "Checkpoint",
           "save_checkpoint", "load_checkpoint", "holds_checkpoint", "list_checkpoints", "step_of", "check_no_checkpoints", "remove_checkpoints",
           "first_nonfinite", "split_optimizer_state", "join_optimizer_state"]

FORMAT_VERSION = 3
DIRNAME = "checkpoints"
MODEL_FILE = "model.safetensors"
STATE_FILE = "state.safetensors"
META_FILE = "trainer.json"
MANIFEST_FILE = "manifest.json"
FILES = (MODEL_FILE, STATE_FILE, META_FILE)
_STEP_DIR = re.compile(r"step-(\d+)(\.prev)?")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the path and what is wrong with it."""


class RunExistsError(CheckpointError):
    """A new run was asked to write into a directory that holds an earlier run's checkpoints."""


class NonFiniteCheckpointError(CheckpointError):
    """A checkpoint would hold NaN or an infinity; `name` and `value` say where."""

    def __init__(self, message, name, value):
        super().__init__(message)
        self.name, self.value = name, value


@dataclass
class Checkpoint:
    path: Path        # the checkpoint directory it was read from
    model: dict       # name -> np.ndarray (the model's state_dict)
    arrays: dict      # name -> np.ndarray (optimizer buffers, hidden state)
    meta: dict        # the contents of trainer.json
    skipped: list = field(default_factory=list)   # one line per newer checkpoint passed over as unusable


def step_dir_name(step):
    return f"step-{step:06d}"


# ------------------------------------------------------------------------------------------------- saving

def save_checkpoint(run_dir, model, arrays, meta, keep=2, keep_best=False):
    """Write a checkpoint of step meta["step"] into run_dir/checkpoints/ atomically (see the module NOTEs), then
    delete all but the `keep` newest (and, with keep_best, the one of lowest valid loss). Returns its path.

    model, arrays: {name: np.ndarray}; meta: a JSON-serialisable dict (gets "format_version"), whose
    meta["evals"]["valid"] (a dict with "step" and "loss"), when present, gives the manifest's valid_loss.
    Raises NonFiniteCheckpointError, before writing anything, when an array or a number in meta is not finite.
    """
    bad = first_nonfinite(model, "model") or first_nonfinite(arrays, "state") or _first_nonfinite_json(meta)
    if bad is not None:
        name, value = bad
        raise NonFiniteCheckpointError(f"not writing a checkpoint of step {meta.get('step', 0)}: {name} holds "
                                       f"{value}", name, value)
    root = Path(run_dir) / DIRNAME
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob("*.tmp"):      # left by a process killed while writing
        shutil.rmtree(stale, ignore_errors=True)
    step = int(meta.get("step", 0))
    final = root / step_dir_name(step)
    tmp, prev = final.with_name(final.name + ".tmp"), final.with_name(final.name + ".prev")
    try:
        tmp.mkdir()
        _write_files(tmp, model, arrays, {"format_version": FORMAT_VERSION, **meta})
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        if prev.exists():             # final is complete, so an old .prev is not needed any more
            shutil.rmtree(prev)
        os.rename(final, prev)
        fsync_path(root)
    os.rename(tmp, final)
    fsync_path(root)
    if prev.exists():
        shutil.rmtree(prev)
    _prune(root, keep, keep_best)
    return final


def _write_files(directory, model, arrays, meta):
    header = {"format": "disttrain", "format_version": str(FORMAT_VERSION), "step": str(meta.get("step", 0))}
    contents = {MODEL_FILE: save_safetensors(_contiguous(model), metadata=header),
                STATE_FILE: save_safetensors(_contiguous(arrays), metadata=header),
                META_FILE: (json.dumps(meta, indent=1, default=_json_default, allow_nan=False) + "\n").encode()}
    files = {name: _write_file(directory / name, data) for name, data in contents.items()}
    manifest = {"format_version": FORMAT_VERSION, "step": meta.get("step", 0), "valid_loss": _valid_loss(meta),
                "files": files}
    _write_file(directory / MANIFEST_FILE, (json.dumps(manifest, indent=1) + "\n").encode())
    fsync_path(directory)


def _write_file(path, data):
    """Write bytes durably; returns the manifest entry {"bytes", "sha256"}. An OSError names the file."""
    with naming(path), open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _valid_loss(meta):
    valid = (meta.get("evals") or {}).get("valid")
    return valid["loss"] if valid and valid.get("step") == meta.get("step") else None


def _prune(root, keep, keep_best):
    """Delete the complete checkpoints beyond the `keep` newest (sparing the best one with keep_best)."""
    complete = sorted(_complete_steps(root).items())
    kept = {step for step, _ in complete[-keep:]} if keep > 0 else set()
    if keep_best:
        losses = {step: _manifest_valid_loss(path) for step, path in complete}
        scored = [(loss, step) for step, loss in losses.items() if loss is not None]
        if scored:
            kept.add(min(scored)[1])
    for step, path in complete:
        if step not in kept:
            shutil.rmtree(path)


def _manifest_valid_loss(path):
    try:
        loss = json.loads((path / MANIFEST_FILE).read_text(encoding="utf-8")).get("valid_loss")
    except (OSError, ValueError, AttributeError):
        return None
    return loss if isinstance(loss, (int, float)) and math.isfinite(loss) else None


def first_nonfinite(arrays, prefix):
    """("<prefix> <name>", a non-finite value) for the first array holding NaN or an infinity, else None."""
    for name, a in arrays.items():
        a = np.asarray(a)
        if a.dtype.kind in "fc" and not np.isfinite(a).all():
            return f"{prefix} {name}", a[~np.isfinite(a)].flat[0].item()
    return None


def _first_nonfinite_json(value, where="trainer.json"):
    if isinstance(value, (float, np.floating)) and not math.isfinite(value):
        return where, float(value)
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) else ()
    for key, item in items:
        found = _first_nonfinite_json(item, f"{where}[{key!r}]")
        if found:
            return found
    return None


def check_no_checkpoints(run_dir):
    """Raise RunExistsError when run_dir holds checkpoints: a new run must not silently replace them."""
    run_dir = Path(run_dir)
    held = list_checkpoints(run_dir) if (run_dir / DIRNAME).is_dir() else []
    if held:
        newest = step_of(held[0])
        raise RunExistsError(f"{run_dir} holds an earlier run ({len(held)} checkpoint(s), the newest of step "
                             f"{newest}): continue it with --resume, or start over with --overwrite (deletes its "
                             f"checkpoints, metrics.jsonl and curves.png)")


def step_of(path):
    """The step number a checkpoint directory's name carries."""
    return int(_STEP_DIR.fullmatch(path.name).group(1))


def remove_checkpoints(run_dir):
    """Delete run_dir/checkpoints and everything in it (complete, .prev and half-written checkpoints)."""
    root = Path(run_dir) / DIRNAME
    if root.exists():
        shutil.rmtree(root)


def _contiguous(arrays):
    return {name: np.ascontiguousarray(a) for name, a in arrays.items()}


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"cannot write {type(value).__name__} into {META_FILE}")


# ------------------------------------------------------------------------------------------------ loading

def _complete_steps(root):
    """{step: directory} of the checkpoints under root (a checkpoints/ directory); a .prev counts only where
    its step-N is missing."""
    found = {}
    for path in root.iterdir() if root.is_dir() else ():
        match = _STEP_DIR.fullmatch(path.name)
        if match and path.is_dir() and (match.group(2) is None or int(match.group(1)) not in found):
            found[int(match.group(1))] = path
    return found


def list_checkpoints(path):
    """The checkpoint directories of a run directory (or of its checkpoints/ directory), newest first; not
    verified."""
    path = Path(path)
    root = path if path.name == DIRNAME else path / DIRNAME
    return [p for _, p in sorted(_complete_steps(root).items(), reverse=True)]


def holds_checkpoint(path):
    """True when `path` is a checkpoint directory or a run directory with at least one checkpoint (unverified)."""
    path = Path(path)
    return (path / MANIFEST_FILE).is_file() or bool(list_checkpoints(path))


def load_checkpoint(path):
    """Read and verify a checkpoint. `path`: a checkpoint directory (that one, or a CheckpointError), or a run
    directory (the newest checkpoint that verifies; `skipped` lists the newer ones passed over and why).

    Raises CheckpointError naming the path and what is missing or wrong.
    """
    path = Path(path)
    if (path / MANIFEST_FILE).is_file() or (path / META_FILE).is_file():
        return _load_one(path)
    candidates = list_checkpoints(path)
    if not candidates:
        raise CheckpointError(f"no checkpoint in {path}: expected {path / DIRNAME}/step-NNNNNN/ (or a checkpoint "
                              f"directory holding {MANIFEST_FILE})")
    problems = []
    for candidate in candidates:
        try:
            checkpoint = _load_one(candidate)
        except CheckpointError as exc:
            problems.append(str(exc))
            continue
        checkpoint.skipped = [f"checkpoint {bad} is unusable: {why}; using {candidate} instead"
                              for bad, why in zip(candidates, problems)]
        return checkpoint
    raise CheckpointError(f"no usable checkpoint in {path}: " + "; ".join(problems))


def _load_one(directory):
    manifest = _read_json(directory / MANIFEST_FILE, "manifest")
    _check_version(directory / MANIFEST_FILE, manifest)
    files = manifest.get("files")
    missing = [name for name in FILES if not isinstance(files, dict) or name not in files]
    if missing:
        raise CheckpointError(f"{directory / MANIFEST_FILE}: lists no digest for {', '.join(missing)}")
    data = {name: _verified_bytes(directory / name, files[name]) for name in FILES}
    meta = _parse_meta(directory / META_FILE, data[META_FILE])
    return Checkpoint(directory, _parse_arrays(directory / MODEL_FILE, data[MODEL_FILE]),
                      _parse_arrays(directory / STATE_FILE, data[STATE_FILE]), meta)


def _read_json(path, what):
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; the checkpoint directory {path.parent} is incomplete")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable {what} ({exc})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value


def _check_version(path, content):
    version = content.get("format_version")
    if version is None:
        raise CheckpointError(f'{path}: no "format_version" field; not a disttrain job checkpoint')
    if version != FORMAT_VERSION:
        raise CheckpointError(f'{path}: "format_version" is {version!r}, this disttrain reads version '
                              f"{FORMAT_VERSION}")


def _verified_bytes(path, entry):
    if not isinstance(entry, dict):
        raise CheckpointError(f"{path.parent / MANIFEST_FILE}: the entry for {path.name} is {entry!r}, not an "
                              f'object with "bytes" and "sha256"; the manifest is damaged')
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; the checkpoint directory {path.parent} is incomplete")
    data = path.read_bytes()
    if len(data) != entry.get("bytes"):
        raise CheckpointError(f"{path}: {len(data)} bytes, the manifest says {entry.get('bytes')}; the file was "
                              f"changed or cut short after it was written")
    digest = hashlib.sha256(data).hexdigest()
    if digest != entry.get("sha256"):
        raise CheckpointError(f"{path}: sha256 {digest[:12]}... differs from the manifest's "
                              f"{str(entry.get('sha256'))[:12]}...; the file was changed after it was written")
    return data


def _parse_meta(path, data):
    try:
        meta = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable ({exc})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(meta).__name__}")
    _check_version(path, meta)
    missing = [key for key in ("step", "epoch", "data", "optimizer", "schedules", "rng", "metrics", "job")
               if key not in meta]
    if missing:
        raise CheckpointError(f"{path}: missing field(s) {', '.join(missing)}")
    return meta


def _parse_arrays(path, data):
    try:
        loaded = load_safetensors(data)
    except (SafetensorError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
    return {name: np.array(a) for name, a in loaded.items()}


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
