"""Data sources: what the training loop trains and evaluates on, and how it is shared among processes.

The contract (a `[data] factory` returns such an object; `LanguageModelData` and `ArrayData` are the two
built in):

    source.train_batches(share) -> Batches    this process's share of every training batch, in order;
                                              Batches is iterable ((inputs, targets) NumPy arrays) and
                                              resumable: len(), position, state_dict(), load_state_dict()
    source.eval_splits                        names of the evaluation splits, e.g. ("valid", "test"), or ()
    source.eval_batches(split, share)         this process's share of a split's batches (an iterable)
    source.batch_axis                         the axis of inputs and targets that holds the examples
    source.sequential                         True when batch k+1 continues batch k's streams (TBPTT): the
                                              model's carried state flows from one to the next
    source.unit                               what a target is, for the logs: "tokens", "examples", ...
    source.language                           True: report perplexity (and bits per character when
                                              source.char_level)

A `Share(index, count)` is one of `count` equal parts of every training batch along `batch_axis`; the parts
side by side are the one-process batch, which is what makes every parallel mode equal the single process.
Evaluation shares may be unequal (the sums are weighted by the number of targets) or empty.
"""
from dataclasses import dataclass

import numpy as np

from disttrain.data.batching import TBPTTIterator, batchify, shard_streams

__all__ = ["Share", "WHOLE", "LanguageModelData", "ArrayData", "ArrayBatches", "EVAL_STREAMS"]

EVAL_STREAMS = 10         # evaluation streams of a language corpus (PyTorch's word_language_model convention)


@dataclass(frozen=True)
class Share:
    """Part `index` of `count` of every batch."""
    index: int = 0
    count: int = 1

    def __post_init__(self):
        if not (isinstance(self.count, int) and self.count >= 1 and 0 <= self.index < self.count):
            raise ValueError(f"a share needs 0 <= index < count, got index {self.index}, count {self.count}")


WHOLE = Share(0, 1)


class LanguageModelData:
    """A Corpus (disttrain.data) for truncated BPTT: the train split cut into `batch_size` streams walked in
    segments of `bptt` tokens (inputs, targets: int64 (T, B)); a share is a contiguous group of streams.
    Evaluation: EVAL_STREAMS streams of each split (fewer for a tiny split), shared near-equally."""

    batch_axis = 1
    sequential = True
    unit = "tokens"
    language = True
    eval_splits = ("valid", "test")

    def __init__(self, corpus, batch_size, bptt, char_level=False):
        self.corpus, self.batch_size, self.bptt, self.char_level = corpus, batch_size, bptt, char_level

    @property
    def vocab_size(self):
        return len(self.corpus.vocab)

    def train_batches(self, share=WHOLE):
        streams = shard_streams(batchify(self.corpus.train, self.batch_size), share.index, share.count)
        return TBPTTIterator(streams, self.bptt)

    def eval_batches(self, split, share=WHOLE):
        ids = self.corpus.split(split)
        streams = batchify(ids, max(1, min(EVAL_STREAMS, ids.size // 2)))
        mine = streams[:, np.array_split(np.arange(streams.shape[1]), share.count)[share.index]]
        return TBPTTIterator(mine, self.bptt) if mine.shape[1] else ()

    def describe(self):
        return f"{self.corpus.train.size:,} train tokens, vocab {self.vocab_size:,}"


class ArrayData:
    """Examples in arrays: inputs (N, ...) and targets (N, ...) cut into batches of `batch_size` rows (the
    last partial batch is dropped), in order or, with shuffle, in a new order every epoch drawn from `seed`.
    eval: {split name: (inputs, targets)}, evaluated in batches of `batch_size` rows. A share is a contiguous
    group of every batch's rows. Float inputs and targets are kept in `dtype` (the model's parameter dtype)."""

    batch_axis = 0
    sequential = False
    unit = "examples"
    language = False
    char_level = False

    def __init__(self, inputs, targets, batch_size, eval=None, shuffle=False, seed=0, dtype=np.float32):
        self.inputs, self.targets = _checked_pair(inputs, targets, "train", dtype)
        if not 1 <= batch_size <= len(self.inputs):
            raise ValueError(f"ArrayData: batch_size = {batch_size} needs 1 <= batch_size <= {len(self.inputs)} "
                             f"(the training examples)")
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.eval = {name: _checked_pair(x, y, name, dtype) for name, (x, y) in (eval or {}).items()}
        self.eval_splits = tuple(self.eval)

    def train_batches(self, share=WHOLE):
        if self.batch_size % share.count:
            raise ValueError(f"ArrayData: batch_size = {self.batch_size} does not split into {share.count} equal "
                             f"shares; choose a multiple of the number of processes")
        return ArrayBatches(self, share)

    def eval_batches(self, split, share=WHOLE):
        inputs, targets = self.eval[split]
        for start in range(0, len(inputs), self.batch_size):
            rows = np.array_split(np.arange(start, min(start + self.batch_size, len(inputs))), share.count)
            mine = rows[share.index]
            if mine.size:
                yield inputs[mine], targets[mine]

    def describe(self):
        return f"{len(self.inputs):,} training examples of shape {self.inputs.shape[1:]}"


class ArrayBatches:
    """ArrayData's training batches for one share: an epoch's worth per iteration, with a resumable cursor
    (the batch index) and the epoch count that picks the shuffled order."""

    def __init__(self, data, share):
        self.data, self.share = data, share
        self.epoch = 0
        self._cursor = 0

    def __len__(self):
        return len(self.data.inputs) // self.data.batch_size

    @property
    def position(self):
        return self._cursor

    def __iter__(self):
        order = self._order()
        width = self.data.batch_size // self.share.count
        while self._cursor < len(self):
            start = self._cursor * self.data.batch_size + self.share.index * width
            rows = order[start:start + width]
            self._cursor += 1
            yield self.data.inputs[rows], self.data.targets[rows]
        self._cursor = 0
        self.epoch += 1

    def _order(self):
        n = len(self.data.inputs)
        if not self.data.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.data.seed, self.epoch]).permutation(n)

    def state_dict(self):
        return {"position": self._cursor, "epoch": self.epoch, "num_batches": len(self)}

    def load_state_dict(self, state):
        if state.get("num_batches", len(self)) != len(self):
            raise ValueError(f"batch state has {state['num_batches']} batches an epoch, this data has {len(self)}; "
                             "resume with the same data and batch_size")
        position = int(state["position"])
        if not 0 <= position <= len(self):
            raise ValueError(f"batch state position {position} out of range [0, {len(self)}]")
        self._cursor, self.epoch = position, int(state.get("epoch", 0))


def _checked_pair(inputs, targets, name, dtype):
    inputs, targets = np.asarray(inputs), np.asarray(targets)
    if len(inputs) != len(targets):
        raise ValueError(f"ArrayData {name}: {len(inputs)} inputs but {len(targets)} targets")
    if inputs.dtype.kind == "f":
        inputs = inputs.astype(dtype, copy=False)
    if targets.dtype.kind == "f":           # regression targets meet the model's outputs in `dtype`
        targets = targets.astype(dtype, copy=False)
    return np.ascontiguousarray(inputs), np.ascontiguousarray(targets)
