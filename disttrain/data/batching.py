"""Batching for truncated backpropagation through time (TBPTT) and its split across ranks.

Layout (as in the PyTorch word_language_model example): the id stream is cut into B equal,
contiguous pieces that become the B columns of an (N, B) array; column b is stream b, read top to
bottom. A TBPTT segment is T consecutive rows, so each column continues exactly where the same
column of the previous segment stopped, which is what lets the model carry its hidden state
(h, c) from one segment into the next.

NOTE: data parallelism splits the columns, never the rows: rank r of W gets columns
[r*B/W, (r+1)*B/W). Every rank then walks the same rows in the same order, has the same number
of segments, and the W shards of one segment side by side are exactly the one-process segment.
"""
import numpy as np


def batchify(ids, batch_size):
    """Integer ids, shape (n,) -> np.int64 streams, shape (N, B) with N = n // B, B = batch_size.

    Column b is ids[b*N:(b+1)*N]; the n - N*B trailing ids are dropped.
    """
    ids = _as_int64(ids, "ids")
    if ids.ndim != 1:
        raise ValueError(f"ids must be 1-D; got shape {ids.shape}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    rows = ids.size // batch_size
    if rows < 2:  # one input row and its target row is the least a segment needs
        raise ValueError(f"batch_size {batch_size} is too large for {ids.size} tokens: each stream would get "
                         f"{rows} token(s), at least 2 are needed")
    return np.ascontiguousarray(ids[: rows * batch_size].reshape(batch_size, rows).T)


def shard_streams(streams, rank, world_size):
    """This rank's contiguous share of the columns: streams (N, B) -> (N, B // world_size).

    B must be divisible by world_size, so that every rank gets the same number of streams.
    """
    streams = _as_streams(streams)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size; got rank={rank}, world_size={world_size}")
    total = streams.shape[1]
    if total % world_size:
        raise ValueError(f"batch size B={total} is not divisible by world_size={world_size}; "
                         f"choose B as a multiple of the number of ranks")
    per_rank = total // world_size
    return np.ascontiguousarray(streams[:, rank * per_rank:(rank + 1) * per_rank])


class TBPTTIterator:
    """Segments of an (N, B) stream array for truncated BPTT, with a resumable cursor.

    Segment k covers rows i = k*bptt .. i+T-1 with T = min(bptt, N-1-i) and yields
    (inputs, targets), both np.int64 of shape (T, B): targets[t] = streams[i+t+1], the input
    shifted by one row. The last segment is shorter when bptt does not divide N-1.

    Iterating continues from the cursor (segment index) and advances it as each segment is handed
    out, so a checkpoint written while segment k is being trained on stores k+1 and a resumed
    job picks up with segment k+1. Running to the end rewinds the cursor to 0 for the next epoch;
    breaking out of the loop does not. Segments are read-only views of the streams.
    """

    def __init__(self, streams, bptt):
        streams = _as_streams(streams)
        if streams.shape[0] < 2:
            raise ValueError(f"streams need at least 2 rows (an input and its target); got shape {streams.shape}")
        if bptt < 1:
            raise ValueError(f"bptt must be >= 1; got {bptt}")
        self._streams = streams.view()
        self._streams.flags.writeable = False  # on this view only: the caller's array stays writeable
        self.bptt = int(bptt)
        self._cursor = 0

    def __len__(self):
        """Number of segments per epoch: ceil((N - 1) / bptt)."""
        return -(-(self._streams.shape[0] - 1) // self.bptt)

    @property
    def batch_size(self):
        return self._streams.shape[1]

    @property
    def position(self):
        """Index of the next segment iteration will yield."""
        return self._cursor

    def segment(self, k):
        """Segment k as (inputs, targets), each of shape (T, B); does not move the cursor."""
        if not 0 <= k < len(self):
            raise IndexError(f"segment {k} out of range [0, {len(self)})")
        start = k * self.bptt
        length = min(self.bptt, self._streams.shape[0] - 1 - start)
        return self._streams[start:start + length], self._streams[start + 1:start + 1 + length]

    def __iter__(self):
        while self._cursor < len(self):
            k = self._cursor
            self._cursor += 1  # advance first: the segment counts as consumed once handed out
            yield self.segment(k)
        self._cursor = 0

    def reset(self):
        """Move the cursor back to the first segment."""
        self._cursor = 0

    def state_dict(self):
        """Plain ints for a job checkpoint: the cursor, plus bptt and the segment count to check on load."""
        return {"position": self._cursor, "bptt": self.bptt, "num_segments": len(self)}

    def load_state_dict(self, state):
        """Restore the cursor; the data and bptt must be those the state was saved with."""
        for key, mine in (("bptt", self.bptt), ("num_segments", len(self))):
            if key in state and state[key] != mine:
                raise ValueError(f"iterator state has {key}={state[key]}, this iterator has {mine}; "
                                 "resume with the same data and bptt")
        position = int(state["position"])
        if not 0 <= position <= len(self):
            raise ValueError(f"iterator state position {position} out of range [0, {len(self)}]")
        self._cursor = position


def _as_int64(array, name):
    array = np.asarray(array)
    if array.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integer token ids; got dtype {array.dtype}")
    return array.astype(np.int64, copy=False)


def _as_streams(streams):
    streams = _as_int64(streams, "streams")
    if streams.ndim != 2:
        raise ValueError(f"streams must have shape (N, B); got shape {streams.shape}")
    return streams
