import numpy as np
import pytest

from disttrain.data import TBPTTIterator, batchify, shard_streams


def test_batchify_columns_are_contiguous_streams():
    ids = np.arange(23)
    streams = batchify(ids, 4)
    assert streams.shape == (5, 4) and streams.dtype == np.int64
    for b in range(4):
        np.testing.assert_array_equal(streams[:, b], ids[b * 5:(b + 1) * 5])  # ids 20..22 dropped


def test_batchify_rejects_bad_input():
    with pytest.raises(ValueError, match="too large for 7 tokens"):
        batchify(np.arange(7), 4)
    with pytest.raises(ValueError, match="batch_size"):
        batchify(np.arange(7), 0)
    with pytest.raises(TypeError, match="integer"):
        batchify(np.zeros(8), 2)
    with pytest.raises(ValueError, match="1-D"):
        batchify(np.zeros((4, 2), dtype=np.int64), 2)


def test_segments_shape_and_shift_by_one():
    streams = batchify(np.arange(40), 4)  # (10, 4)
    segments = list(TBPTTIterator(streams, bptt=3))
    assert len(segments) == len(TBPTTIterator(streams, 3)) == 3  # ceil((10 - 1) / 3)
    for inputs, targets in segments:
        assert inputs.shape == targets.shape == (3, 4) and inputs.dtype == np.int64
        np.testing.assert_array_equal(targets, inputs + 1)  # arange data: next token = id + 1
    np.testing.assert_array_equal(np.concatenate([x for x, _ in segments]), streams[:-1])
    np.testing.assert_array_equal(np.concatenate([y for _, y in segments]), streams[1:])


def test_last_segment_is_shorter():
    iterator = TBPTTIterator(batchify(np.arange(24), 2), bptt=5)  # N = 12: 11 input rows
    lengths = [inputs.shape[0] for inputs, _ in iterator]
    assert lengths == [5, 5, 1] and len(iterator) == 3


def test_segments_are_read_only_views():
    streams = batchify(np.arange(20), 2)
    inputs, _ = next(iter(TBPTTIterator(streams, 4)))
    with pytest.raises(ValueError):
        inputs[0, 0] = 99
    streams[0, 0] = 7  # the caller's array stays writeable


def test_epoch_end_rewinds_cursor():
    iterator = TBPTTIterator(batchify(np.arange(30), 3), bptt=4)
    first, second = list(iterator), list(iterator)
    assert len(first) == len(second) == len(iterator)
    assert iterator.position == 0


def test_resume_from_state_equals_continuing():
    streams = batchify(np.random.default_rng(0).integers(0, 50, size=1000), 5)
    reference = [seg for seg in TBPTTIterator(streams, bptt=7)]

    running = TBPTTIterator(streams, bptt=7)
    for k, _ in enumerate(running):
        if k == 10:  # "checkpoint" while segment 10 is being trained on
            state = running.state_dict()
            break
    assert state == {"position": 11, "bptt": 7, "num_segments": len(reference)}
    assert all(type(v) is int for v in state.values())

    resumed = TBPTTIterator(streams, bptt=7)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(rest) == len(reference) - 11
    for (x, y), (rx, ry) in zip(rest, reference[11:]):
        np.testing.assert_array_equal(x, rx)
        np.testing.assert_array_equal(y, ry)
    assert resumed.position == 0  # that epoch is finished


def test_load_state_rejects_mismatch():
    iterator = TBPTTIterator(batchify(np.arange(100), 2), bptt=5)
    with pytest.raises(ValueError, match="bptt=6"):
        iterator.load_state_dict({"position": 1, "bptt": 6, "num_segments": len(iterator)})
    with pytest.raises(ValueError, match="out of range"):
        iterator.load_state_dict({"position": 99})


def test_iterator_rejects_bad_input():
    with pytest.raises(ValueError, match="bptt"):
        TBPTTIterator(batchify(np.arange(10), 2), bptt=0)
    with pytest.raises(ValueError, match="at least 2 rows"):
        TBPTTIterator(np.zeros((1, 3), dtype=np.int64), bptt=2)


@pytest.mark.parametrize("world_size", [1, 2, 3, 6])
def test_shards_side_by_side_equal_unsharded(world_size):
    streams = batchify(np.arange(600), 6)
    shards = [shard_streams(streams, r, world_size) for r in range(world_size)]
    assert all(s.shape == (100, 6 // world_size) for s in shards)
    np.testing.assert_array_equal(np.concatenate(shards, axis=1), streams)
    # Segment by segment too: W ranks together see what one process sees.
    per_rank = [list(TBPTTIterator(s, bptt=9)) for s in shards]
    for k, (inputs, targets) in enumerate(TBPTTIterator(streams, bptt=9)):
        np.testing.assert_array_equal(np.concatenate([segs[k][0] for segs in per_rank], axis=1), inputs)
        np.testing.assert_array_equal(np.concatenate([segs[k][1] for segs in per_rank], axis=1), targets)


def test_shard_errors_name_batch_and_world_size():
    streams = batchify(np.arange(100), 5)
    with pytest.raises(ValueError, match=r"B=5.*world_size=2"):
        shard_streams(streams, 0, 2)
    with pytest.raises(ValueError, match="rank"):
        shard_streams(streams, 5, 5)
