"""Penn Treebank, word level: the Mikolov language-modelling split (ptb.{train,valid,test}.txt).

Each line is one sentence of space-separated tokens (rare words already `<unk>`, numbers `N`);
we append an `<eos>` token at every line end, as the standard setup (Zaremba et al. 2014, the
PyTorch word_language_model example) does. The vocabulary comes from the training split only
and has exactly 10,000 entries (9,999 words + `<eos>`); valid/test hold no other word.
"""
import gzip
import os
from pathlib import Path

from disttrain.data.corpus import SPLITS, Corpus
from disttrain.data.vocab import EOS, Vocabulary

PTB_ENV_VAR = "DISTTRAIN_PTB"
PTB_VOCAB_SIZE = 10_000
PTB_FALLBACK = "../shared/data/ptb"       # beside a checkout of this repository, when $DISTTRAIN_PTB is unset
_WHERE_TO_GET = (
    "The standard files are the Mikolov PTB language-modelling split (ptb.train.txt, ptb.valid.txt, "
    "ptb.test.txt, gzipped or not), e.g. the data/ folder of "
    "http://www.fit.vutbr.cz/~imikolov/rnnlm/simple-examples.tgz"
)


def default_ptb_path():
    """$DISTTRAIN_PTB if set, else ptb_fallback(), absolute."""
    env = os.environ.get(PTB_ENV_VAR)
    path = Path(env).expanduser() if env else Path(ptb_fallback())
    return Path(os.path.abspath(path))


def ptb_fallback():
    """PTB_FALLBACK as a path: from the working directory, as a job's relative paths are, unless it is not there
    and it is beside the checkout disttrain runs from (a job started from another directory), then that one."""
    beside_checkout = Path(__file__).resolve().parents[2] / PTB_FALLBACK
    if not Path(PTB_FALLBACK).is_dir() and beside_checkout.is_dir():
        return str(beside_checkout.resolve())
    return PTB_FALLBACK


def ptb_file(directory, split):
    """Path of ptb.<split>.txt.gz, or of ptb.<split>.txt if only that exists; FileNotFoundError if neither."""
    directory = Path(directory)
    candidates = [directory / f"ptb.{split}.txt.gz", directory / f"ptb.{split}.txt"]
    for path in candidates:
        if path.is_file():
            return path
    where = "directory does not exist" if not directory.is_dir() else "file is missing"
    raise FileNotFoundError(
        f"PTB {split} split not found: {candidates[0]} (or {candidates[1].name}); {where}. "
        f"Pass the directory explicitly or set ${PTB_ENV_VAR} to it. {_WHERE_TO_GET}."
    )


def read_ptb_tokens(path):
    """Tokens of one PTB file: each line's whitespace-split words followed by <eos>."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        lines = f.read().splitlines()
    tokens = []
    for line in lines:
        tokens.extend(line.split())
        tokens.append(EOS)
    return tokens


def load_ptb(path=None, expected_vocab_size=PTB_VOCAB_SIZE):
    """Read the three PTB splits from directory path (default: default_ptb_path()).

    Returns a Corpus whose train/valid/test are np.int64 arrays of shape (n_tokens,); <eos> is id 0.
    expected_vocab_size: the training split must yield exactly this many vocabulary entries
        (a guard against a truncated or different file); None skips the check.
    """
    directory = default_ptb_path() if path is None else Path(path).expanduser()
    files = {split: ptb_file(directory, split) for split in SPLITS}  # fail before any reading
    tokens = {split: read_ptb_tokens(file) for split, file in files.items()}
    vocab = Vocabulary.build(tokens["train"], specials=(EOS,))
    if expected_vocab_size is not None and len(vocab) != expected_vocab_size:
        raise ValueError(
            f"{files['train']} gives a vocabulary of {len(vocab)} entries, expected {expected_vocab_size}; "
            f"is it the standard split? {_WHERE_TO_GET}."
        )
    ids = {split: _encode_split(vocab, toks, files[split]) for split, toks in tokens.items()}
    return Corpus(vocab=vocab, **ids)


def _encode_split(vocab, tokens, path):
    try:
        return vocab.encode(tokens)
    except KeyError as exc:
        raise ValueError(f"{path}: {exc.args[0]} (the vocabulary comes from the train split only)") from None
