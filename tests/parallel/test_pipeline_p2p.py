"""Pipeline pieces that need no MPI job: shape headers, micro-batch splitting, the link's layout check."""
import numpy as np
import pytest

from disttrain.parallel.pipeline.p2p import StageLink, decode_header, encode_header
from disttrain.parallel.pipeline.runtime import split_micro_batches


@pytest.mark.parametrize("shape,dtype", [((5, 2, 7), np.float32), ((3,), np.float64), ((), np.float32),
                                         ((1, 2, 3, 4, 5, 6, 7, 8), np.int64)])
def test_header_round_trip(shape, dtype):
    header = encode_header(shape, np.dtype(dtype))
    assert header.dtype == np.int64 and header.shape == (10,)
    assert decode_header(header) == (shape, np.dtype(dtype).name)


def test_header_refuses_what_it_cannot_describe():
    with pytest.raises(ValueError, match="dtype complex128"):
        encode_header((2,), np.complex128)
    with pytest.raises(ValueError, match="at most 8 dimensions"):
        encode_header((1,) * 9, np.float32)


def test_micro_batches_are_column_groups():
    tokens = np.arange(24).reshape(3, 8)
    pieces = split_micro_batches(tokens, 4, axis=1)
    assert [p.shape for p in pieces] == [(3, 2)] * 4 and all(p.flags.c_contiguous for p in pieces)
    np.testing.assert_array_equal(np.concatenate(pieces, axis=1), tokens)
    with pytest.raises(ValueError, match="batch of 8 along axis 1 does not divide into 3 micro-batches"):
        split_micro_batches(tokens, 3, axis=1)


class _World:
    rank, size = 1, 3

    def supports_threads(self):
        return False


def test_link_needs_rank_equal_to_stage():
    with pytest.raises(ValueError, match="rank = stage index; got rank 1 of 3 for stage 0"):
        StageLink(_World(), 0, 3)
    link = StageLink(_World(), 1, 3)
    assert (link.prev, link.next) == (0, 2)
