"""Language-modelling data: corpora (PTB words, character text, the embedded default corpus),
TBPTT batching and the split of streams across data-parallel ranks. Pure NumPy."""
from disttrain.data.batching import TBPTTIterator, batchify, shard_streams
from disttrain.data.chars import load_char_corpus
from disttrain.data.corpus import Corpus
from disttrain.data.default_corpus import default_corpus_text, load_default_corpus
from disttrain.data.ptb import PTB_ENV_VAR, default_ptb_path, load_ptb
from disttrain.data.vocab import EOS, Vocabulary

__all__ = [
    "Corpus",
    "EOS",
    "PTB_ENV_VAR",
    "TBPTTIterator",
    "Vocabulary",
    "batchify",
    "default_corpus_text",
    "default_ptb_path",
    "load_char_corpus",
    "load_default_corpus",
    "load_ptb",
    "shard_streams",
]
