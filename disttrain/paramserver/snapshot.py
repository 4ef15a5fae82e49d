"""Atomic snapshot files: named NumPy arrays plus a msgpack metadata map, in one safetensors file.

Layout: a safetensors file (readable by any safetensors reader: `safetensors.numpy.load_file`) whose arrays are
the snapshot's, and whose string metadata holds
    "format"   "disttrain-ps-snapshot"
    "version"  "2"
    "meta"     the metadata map, msgpack, base64
    "names"    the arrays' names in the order they were given (JSON), the order load_snapshot returns them in
    "sha256"   of the msgpack metadata bytes, then every array's name and bytes in name order

NOTE (atomicity): a snapshot is written to `.<name>.tmp-<pid>` in the same directory, flushed and fsynced,
renamed over `<name>` and the directory fsynced. A process killed at any moment leaves either the previous
complete snapshot or the new complete one under `<name>`, never a mix; a stray temp file is ignored by
`load_snapshot` and removed by the next `save_snapshot`. A write that fails (a full disk, a read-only volume)
removes its temp file before raising. The sha256 catches a file damaged later (disk, copy).

NOTE (reading): a snapshot is checked like a message from a peer before anything is built from it: safetensors
parses and bounds the header and the arrays; the metadata map nests at most MAX_DEPTH levels, every array is of
an allowed dtype with a shape that protocol.check_shape accepts, and the digest matches; any failure is a
SnapshotError naming the file.
"""
import base64
import hashlib
import json
import os
from pathlib import Path

import msgpack
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save as save_safetensors

from disttrain.fsutil import fsync_path

from disttrain.paramserver.protocol import DTYPES, ProtocolError, check_depth, check_shape, show

__all__ = ["SnapshotError", "save_snapshot", "load_snapshot", "read_meta"]

FORMAT = "disttrain-ps-snapshot"
VERSION = "2"
_FORMAT_1_MAGIC = b"DTPSSNAP"    # the first bytes of the format before safetensors, to name it when met
MAX_DEPTH = 32                    # optimizer and schedule state nest a few levels; nothing needs more
_DTYPES = {**DTYPES, "<i8": np.dtype("<i8")}


class SnapshotError(RuntimeError):
    """A snapshot file that cannot be used; the message names the file and the problem."""


def save_snapshot(path, arrays, meta):
    """Write {name: array} and the msgpack-able dict `meta` to `path` atomically; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.tmp-*"):
        stale.unlink(missing_ok=True)
    arrays = {name: np.ascontiguousarray(array) for name, array in arrays.items()}
    for name, array in arrays.items():
        if array.dtype.str not in _DTYPES:
            raise ValueError(f"snapshot array {name!r}: dtype {array.dtype} is not one of {sorted(_DTYPES)}")
    packed = msgpack.packb(meta, use_bin_type=True)
    data = save_safetensors(arrays, metadata={"format": FORMAT, "version": VERSION,
                                              "meta": base64.b64encode(packed).decode("ascii"),
                                              "names": json.dumps(list(arrays)),
                                              "sha256": _digest(packed, arrays)})
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)     # a full disk: the half-written file would only take more of it
        raise
    fsync_path(path.parent)
    return path


def load_snapshot(path):
    """(arrays, meta) from a file written by save_snapshot; raises SnapshotError naming what is wrong."""
    path = Path(path)
    metadata, arrays = _read(path, with_arrays=True)
    packed, meta = _meta(path, metadata)
    for name, array in arrays.items():
        _check_array(path, name, array)
    if _digest(packed, arrays) != metadata.get("sha256"):
        raise SnapshotError(f"{path}: checksum mismatch (sha256); the file is damaged")
    return {name: arrays[name] for name in _order(path, metadata, arrays)}, meta


def read_meta(path):
    """The metadata map of a snapshot without reading its arrays (e.g. to say what a restart restores)."""
    path = Path(path)
    return _meta(path, _read(path, with_arrays=False)[0])[1]


def _read(path, with_arrays):
    """(safetensors string metadata, {name: array} or None) of the file at `path`, in one opening."""
    try:
        with open(path, "rb") as fh:
            _refuse_format_1(path, fh.read(len(_FORMAT_1_MAGIC)))
    except OSError as exc:
        raise SnapshotError(f"{path}: cannot read the snapshot ({exc.strerror or exc})") from None
    try:
        with safe_open(path, "np") as opened:
            arrays = {name: opened.get_tensor(name) for name in opened.keys()} if with_arrays else None
            return opened.metadata() or {}, arrays
    except (SafetensorError, ValueError, OSError) as exc:
        raise SnapshotError(f"{path}: not a readable snapshot ({show(str(exc), 200)})") from None


def _order(path, metadata, arrays):
    """The arrays' names in the order they were saved in."""
    try:
        names = json.loads(metadata.get("names", ""))
    except json.JSONDecodeError:
        names = None
    if not isinstance(names, list) or sorted(map(str, names)) != sorted(arrays):
        raise SnapshotError(f"{path}: the list of array names does not match the arrays; the file is damaged")
    return names


def _refuse_format_1(path, head):
    if head == _FORMAT_1_MAGIC:
        raise SnapshotError(f"{path}: a snapshot in format 1, written by an earlier disttrain; this one reads format "
                            f"{VERSION} (safetensors): start the run over (ps-cluster --overwrite)")


def _meta(path, metadata):
    """(msgpack bytes, map) of a snapshot's metadata; checks the format, the version and the map's depth."""
    if metadata.get("format") != FORMAT:
        raise SnapshotError(f"{path}: not a disttrain parameter-server snapshot (a safetensors file with format "
                            f"{show(metadata.get('format'))})")
    if metadata.get("version") != VERSION:
        raise SnapshotError(f"{path}: snapshot format version {show(metadata.get('version'))}, this disttrain "
                            f"reads version {VERSION}")
    try:
        packed = base64.b64decode(metadata.get("meta", ""), validate=True)
        meta = msgpack.unpackb(packed, raw=False, strict_map_key=False)
        check_depth(meta, MAX_DEPTH)
    except Exception as exc:     # base64 and msgpack raise many kinds on bad bytes; check_depth a ProtocolError
        raise SnapshotError(f"{path}: unreadable metadata ({type(exc).__name__}: {show(str(exc), 200)})") from None
    if not isinstance(meta, dict):
        raise SnapshotError(f"{path}: the metadata is not a map (got {show(meta)})")
    return packed, meta


def _check_array(path, name, array):
    if array.dtype.str not in _DTYPES:
        raise SnapshotError(f"{path}: array {show(name)}: dtype {array.dtype} (allowed: {sorted(_DTYPES)})")
    try:
        check_shape(list(array.shape), "shape")
    except ProtocolError as exc:
        raise SnapshotError(f"{path}: array {show(name)}: {exc}") from None


def _digest(packed_meta, arrays):
    """sha256 of the msgpack metadata, then each array's name and bytes, in name order (hex)."""
    digest = hashlib.sha256(packed_meta)
    for name in sorted(arrays):
        digest.update(name.encode())
        digest.update(memoryview(np.ascontiguousarray(arrays[name])).cast("B"))
    return digest.hexdigest()
