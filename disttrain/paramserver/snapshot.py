"""Atomic snapshot files: named NumPy arrays plus a msgpack metadata map, in one file.

Layout:
    8 bytes    b"DTPSSNAP"
    8 bytes    header length H, little-endian
    H bytes    msgpack {"version": 1, "meta": {...}, "arrays": [[name, dtype, shape, offset, nbytes], ...],
                        "data_bytes": D, "crc32": CRC of the D data bytes}
    padding    to a multiple of 64 bytes
    D bytes    the arrays' raw bytes, each starting at a multiple of 64

NOTE (atomicity): a snapshot is written to `.<name>.tmp-<pid>` in the same directory, flushed and fsynced,
renamed over `<name>` and the directory fsynced. A process killed at any moment leaves either the previous
complete snapshot or the new complete one under `<name>`, never a mix; a stray temp file is ignored by
`load_snapshot` and removed by the next `save_snapshot`. The CRC catches a file damaged later (disk, copy).
"""
import os
import zlib
from pathlib import Path

import msgpack
import numpy as np

from disttrain.fsutil import fsync_path

from disttrain.paramserver.protocol import DTYPES

__all__ = ["SnapshotError", "save_snapshot", "load_snapshot"]

MAGIC = b"DTPSSNAP"
VERSION = 1
ALIGN = 64
_DTYPES = {**DTYPES, "<i8": np.dtype("<i8")}


class SnapshotError(RuntimeError):
    """A snapshot file that cannot be used; the message names the file and the problem."""


def save_snapshot(path, arrays, meta):
    """Write {name: array} and the msgpack-able dict `meta` to `path` atomically; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.tmp-*"):
        stale.unlink(missing_ok=True)
    entries, offset, blobs = [], 0, []
    for name, array in arrays.items():
        array = np.ascontiguousarray(array)
        dtype = array.dtype.str
        if dtype not in _DTYPES:
            raise ValueError(f"snapshot array {name!r}: dtype {array.dtype} is not one of {sorted(_DTYPES)}")
        offset = -(-offset // ALIGN) * ALIGN
        entries.append([name, dtype, list(array.shape), offset, array.nbytes])
        blobs.append((offset, array))
        offset += array.nbytes
    data_bytes = offset
    crc = 0
    for _, array in blobs:
        crc = zlib.crc32(memoryview(array).cast("B"), crc)   # padding is zeros and not summed
    header = msgpack.packb({"version": VERSION, "meta": meta, "arrays": entries, "data_bytes": data_bytes,
                            "crc32": crc}, use_bin_type=True)
    start = -(-(len(MAGIC) + 8 + len(header)) // ALIGN) * ALIGN
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(MAGIC + len(header).to_bytes(8, "little") + header)
        fh.write(b"\0" * (start - fh.tell()))
        for off, array in blobs:
            fh.write(b"\0" * (start + off - fh.tell()))
            fh.write(memoryview(array).cast("B"))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)
    return path


def load_snapshot(path):
    """(arrays, meta) from a file written by save_snapshot; raises SnapshotError naming what is wrong."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise SnapshotError(f"{path}: cannot read the snapshot ({exc.strerror or exc})") from None
    if raw[:len(MAGIC)] != MAGIC or len(raw) < len(MAGIC) + 8:
        raise SnapshotError(f"{path}: not a disttrain parameter-server snapshot (bad magic)")
    size = int.from_bytes(raw[len(MAGIC):len(MAGIC) + 8], "little")
    begin = len(MAGIC) + 8
    if size > len(raw) - begin:
        raise SnapshotError(f"{path}: truncated header ({size} bytes declared, {len(raw) - begin} present)")
    try:
        header = msgpack.unpackb(raw[begin:begin + size], raw=False, strict_map_key=False)
    except Exception as exc:
        raise SnapshotError(f"{path}: unreadable header ({type(exc).__name__}: {exc})") from None
    version = header.get("version") if isinstance(header, dict) else None
    if version != VERSION:
        raise SnapshotError(f"{path}: snapshot format version {version}, this disttrain reads version {VERSION}")
    start = -(-(begin + size) // ALIGN) * ALIGN
    data = memoryview(raw)[start:]
    if len(data) != header.get("data_bytes"):
        raise SnapshotError(f"{path}: {len(data)} data bytes, the header declares {header.get('data_bytes')}")
    arrays, crc = {}, 0
    try:
        for name, dtype, shape, offset, nbytes in header["arrays"]:
            dt = _DTYPES[dtype]
            chunk = data[offset:offset + nbytes]
            if len(chunk) != nbytes or int(np.prod(shape, dtype=np.int64)) * dt.itemsize != nbytes:
                raise SnapshotError(f"{path}: array {name!r} of shape {shape} does not fit its {nbytes} bytes")
            crc = zlib.crc32(chunk, crc)
            arrays[name] = np.frombuffer(chunk, dtype=dt).reshape(shape).copy()
    except (KeyError, TypeError, ValueError) as exc:
        raise SnapshotError(f"{path}: malformed array table ({type(exc).__name__}: {exc})") from None
    if crc != header.get("crc32"):
        raise SnapshotError(f"{path}: checksum mismatch; the file is damaged")
    return arrays, header.get("meta", {})
