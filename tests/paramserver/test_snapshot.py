"""Snapshot files: exact round trip, atomic replacement, damage detected."""
import errno
import os

import numpy as np
import pytest

from disttrain.paramserver.snapshot import SnapshotError, load_snapshot, read_meta, save_snapshot


def sample():
    rng = np.random.default_rng(0)
    return {"a": rng.standard_normal(1000).astype("<f4"), "b": rng.standard_normal((3, 5)),
            "empty": np.zeros(0, "<f4"), "steps": np.arange(4, dtype="<i8")}


def test_round_trip_is_exact(tmp_path):
    arrays, meta = sample(), {"updates": 7, "nested": {"lr": 0.5, "betas": [0.9, 0.999]}, "none": None}
    save_snapshot(tmp_path / "s.snap", arrays, meta)
    loaded, meta2 = load_snapshot(tmp_path / "s.snap")
    assert meta2 == meta and list(loaded) == list(arrays)
    for name in arrays:
        assert loaded[name].dtype == arrays[name].dtype
        np.testing.assert_array_equal(loaded[name], arrays[name])
        assert loaded[name].flags.writeable


def test_replacement_is_atomic_and_stale_temp_files_are_ignored(tmp_path):
    path = tmp_path / "s.snap"
    save_snapshot(path, {"x": np.ones(3, "<f4")}, {"n": 1})
    stale = tmp_path / ".s.snap.tmp-99999"
    stale.write_bytes(b"half a snapshot")          # what a kill during a write leaves behind
    assert load_snapshot(path)[1] == {"n": 1}
    save_snapshot(path, {"x": np.full(3, 2, "<f4")}, {"n": 2})
    assert not stale.exists()
    assert load_snapshot(path)[1] == {"n": 2}
    assert sorted(os.listdir(tmp_path)) == ["s.snap"]


@pytest.mark.parametrize("failing", ["write", "fsync", "replace"])
def test_a_failed_write_leaves_the_previous_snapshot_and_no_temp_file(tmp_path, monkeypatch, failing):
    path = tmp_path / "s.snap"
    save_snapshot(path, {"x": np.ones(3, "<f4")}, {"n": 1})

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if failing == "write":
        monkeypatch.setattr("disttrain.paramserver.snapshot.open", _half_written, raising=False)
    else:
        monkeypatch.setattr(f"disttrain.paramserver.snapshot.os.{failing}", no_space)
    with pytest.raises(OSError, match="No space left on device"):
        save_snapshot(path, {"x": np.full(3, 2, "<f4")}, {"n": 2})
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["s.snap"]
    assert load_snapshot(path)[1] == {"n": 1}


def _half_written(path, mode):
    """A file that takes half of what is written to it and then finds the disk full."""
    fh = open(path, mode)
    write = fh.write

    def write_half(data):
        write(data[:len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    fh.write = write_half
    return fh


@pytest.mark.parametrize("damage, message", [
    (lambda b: b"XXXX" + b[4:], "not a readable snapshot"),
    (lambda b: b[:-7], "not a readable snapshot"),
    (lambda b: b[:-1] + bytes([b[-1] ^ 1]), "checksum mismatch"),                        # an array's last byte
    (lambda b: _flip_in_meta(b), "checksum mismatch|unreadable metadata"),
    (lambda b: b[:20], "not a readable snapshot"),
])
def test_damage_is_detected(tmp_path, damage, message):
    path = tmp_path / "s.snap"
    save_snapshot(path, sample(), {"n": 1})
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(SnapshotError, match=message):
        load_snapshot(path)


def _flip_in_meta(data):
    """One base64 character of the metadata map changed to another valid one: it still decodes, to other bytes."""
    start = data.index(b'"meta":"') + len(b'"meta":"') + 4
    return data[:start] + (b"B" if data[start:start + 1] != b"B" else b"C") + data[start + 1:]


def test_a_safetensors_file_is_readable_by_safetensors_and_others_are_refused(tmp_path):
    from safetensors.numpy import load_file, save_file

    save_snapshot(tmp_path / "s.snap", sample(), {"n": 1})
    np.testing.assert_array_equal(load_file(tmp_path / "s.snap")["a"], sample()["a"])
    save_file({"x": np.ones(2, "<f4")}, tmp_path / "other.safetensors")
    with pytest.raises(SnapshotError, match="not a disttrain parameter-server snapshot"):
        load_snapshot(tmp_path / "other.safetensors")


def test_missing_file_and_bad_dtype(tmp_path):
    with pytest.raises(SnapshotError, match="cannot read"):
        load_snapshot(tmp_path / "nope.snap")
    with pytest.raises(ValueError, match="dtype"):
        save_snapshot(tmp_path / "s.snap", {"x": np.zeros(2, dtype=object)}, {})


def test_random_damage_is_a_snapshot_error_or_changes_nothing(tmp_path):
    """Bytes flipped anywhere (the safetensors header, the metadata, the arrays): load_snapshot raises only
    SnapshotError, or, where the flip fell on bytes that carry nothing (header padding), returns the same."""
    import random

    path = tmp_path / "s.snap"
    arrays, meta = sample(), {"updates": 3, "nested": [1, {"x": None}]}
    save_snapshot(path, arrays, meta)
    good, rng = path.read_bytes(), random.Random(0)
    for _ in range(300):
        damaged = bytearray(good)
        for _ in range(rng.randint(1, 4)):
            damaged[rng.randrange(len(damaged))] = rng.randrange(256)
        path.write_bytes(bytes(damaged))
        try:
            loaded, loaded_meta = load_snapshot(path)
        except SnapshotError:
            continue
        assert loaded_meta == meta and all(np.array_equal(loaded[k], arrays[k]) for k in arrays)


def test_a_snapshot_of_the_format_before_safetensors_is_named_as_such(tmp_path):
    import msgpack

    header = msgpack.packb({"version": 1, "meta": {}, "arrays": [], "data_bytes": 0, "crc32": 0})
    path = tmp_path / "old.snap"
    path.write_bytes(b"DTPSSNAP" + len(header).to_bytes(8, "little") + header)
    for read in (load_snapshot, read_meta):
        with pytest.raises(SnapshotError, match=r"a snapshot in format 1, written by an earlier disttrain; .* start "
                                                r"the run over \(ps-cluster --overwrite\)"):
            read(path)
