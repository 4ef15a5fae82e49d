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

NOTE (reading): a snapshot is checked like a message from a peer before anything is built from it: the header
nests at most MAX_DEPTH levels, every array entry is [name, dtype, shape, offset, nbytes] with a shape that
protocol.check_shape accepts and nbytes equal to what shape and dtype need (protocol.array_nbytes, no
overflow), inside the data; any failure is a SnapshotError naming the file.
"""
import os
import zlib
from pathlib import Path

import msgpack
import numpy as np

from disttrain.fsutil import fsync_path

from disttrain.paramserver.protocol import (DTYPES, MAX_ARRAY_BYTES, ProtocolError, array_nbytes, check_depth,
                                            check_shape, show)

__all__ = ["SnapshotError", "save_snapshot", "load_snapshot", "read_meta"]

MAGIC = b"DTPSSNAP"
VERSION = 1
ALIGN = 64
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
    header, start = _header(path, raw)
    data = memoryview(raw)[start:]
    if len(data) != header.get("data_bytes"):
        raise SnapshotError(f"{path}: {len(data)} data bytes, the header declares {show(header.get('data_bytes'))}")
    entries = header.get("arrays")
    if not isinstance(entries, list):
        raise SnapshotError(f"{path}: malformed array table (got {show(entries)})")
    arrays, crc = {}, 0
    for entry in entries:
        name, dt, shape, offset, nbytes = _entry(path, entry, len(data))
        chunk = data[offset:offset + nbytes]
        crc = zlib.crc32(chunk, crc)
        arrays[name] = np.frombuffer(chunk, dtype=dt).reshape(shape).copy()
    if crc != header.get("crc32"):
        raise SnapshotError(f"{path}: checksum mismatch; the file is damaged")
    return arrays, header["meta"]


def read_meta(path):
    """The metadata map of a snapshot without reading its arrays (e.g. to say what a restart restores)."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            raw = fh.read(len(MAGIC) + 8)
            size = int.from_bytes(raw[len(MAGIC):], "little") if len(raw) == len(MAGIC) + 8 else 0
            raw += fh.read(min(size, 1 << 30))
    except OSError as exc:
        raise SnapshotError(f"{path}: cannot read the snapshot ({exc.strerror or exc})") from None
    return _header(path, raw)[0]["meta"]


def _header(path, raw):
    """(header map, start of the data) of a snapshot's bytes; checks magic, size, depth and the meta map."""
    if raw[:len(MAGIC)] != MAGIC or len(raw) < len(MAGIC) + 8:
        raise SnapshotError(f"{path}: not a disttrain parameter-server snapshot (bad magic)")
    size = int.from_bytes(raw[len(MAGIC):len(MAGIC) + 8], "little")
    begin = len(MAGIC) + 8
    if size > len(raw) - begin:
        raise SnapshotError(f"{path}: truncated header ({size} bytes declared, {len(raw) - begin} present)")
    try:
        header = msgpack.unpackb(raw[begin:begin + size], raw=False, strict_map_key=False)
        check_depth(header, MAX_DEPTH)
    except Exception as exc:     # msgpack raises many kinds on bad bytes; check_depth a ProtocolError
        raise SnapshotError(f"{path}: unreadable header ({type(exc).__name__}: {show(str(exc), 200)})") from None
    version = header.get("version") if isinstance(header, dict) else None
    if version != VERSION:
        raise SnapshotError(f"{path}: snapshot format version {show(version)}, this disttrain reads version {VERSION}")
    if not isinstance(header.get("meta"), dict):
        raise SnapshotError(f"{path}: the metadata is not a map (got {show(header.get('meta'))})")
    return header, -(-(begin + size) // ALIGN) * ALIGN


def _entry(path, entry, data_bytes):
    """(name, dtype, shape, offset, nbytes) of one array-table entry, checked to fit its bytes and the data."""
    if not isinstance(entry, list) or len(entry) != 5:
        raise SnapshotError(f"{path}: malformed array table entry {show(entry)}")
    name, dtype, shape, offset, nbytes = entry
    where = f"{path}: array {show(name)}"
    if not isinstance(name, str) or not isinstance(dtype, str) or dtype not in _DTYPES:
        raise SnapshotError(f"{where}: bad name or dtype {show(dtype)} (allowed: {sorted(_DTYPES)})")
    try:
        check_shape(shape, "shape")
    except ProtocolError as exc:
        raise SnapshotError(f"{where}: {exc}") from None
    dt = _DTYPES[dtype]
    for field, value in (("offset", offset), ("nbytes", nbytes)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= data_bytes:
            raise SnapshotError(f"{where}: {field} {show(value)} is not within the {data_bytes} data bytes")
    if array_nbytes(shape, dt.itemsize, MAX_ARRAY_BYTES) != nbytes or offset + nbytes > data_bytes:
        raise SnapshotError(f"{where}: shape {show(shape)} of {dtype} does not fit its {nbytes} bytes at offset "
                            f"{offset} of {data_bytes}")
    return name, dt, shape, offset, nbytes
