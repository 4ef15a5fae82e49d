"""The embedded default corpus: Python standard-library source code, present wherever Python is.

It needs no download, so examples and tests can train a character model anywhere. The text is
the .py files under sysconfig's "stdlib" directory, sorted by relative path and concatenated
until a size cap; test suites, IDLE, site-packages and files that are not valid UTF-8 are
skipped. The same Python installation therefore always yields the same text (different Python
versions may differ, which is why the text is not frozen into the repository).
"""
import os
import sysconfig
from pathlib import Path

from disttrain.data.chars import DEFAULT_SPLIT, load_char_corpus

DEFAULT_MAX_BYTES = 2_000_000
SKIP_DIRS = frozenset({"test", "tests", "idlelib", "site-packages", "__pycache__"})


def stdlib_dir():
    """The running Python's standard-library directory."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_sources(root=None):
    """Relative POSIX paths of the eligible .py files under root (default stdlib_dir()), sorted."""
    root = stdlib_dir() if root is None else Path(root)
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS]  # prune in place: os.walk skips them
        rel = Path(dirpath).relative_to(root)
        found.extend((rel / name).as_posix() for name in filenames if name.endswith(".py"))
    return sorted(found)


def default_corpus_text(max_bytes=DEFAULT_MAX_BYTES, root=None):
    """Concatenated stdlib sources, at most max_bytes bytes of UTF-8, each file ending in a newline.

    The file that crosses the cap is cut at its last line break that fits, so the text ends on a
    whole line and the cap is met closely without ever being exceeded.
    """
    if max_bytes < 1:
        raise ValueError(f"max_bytes must be positive; got {max_bytes}")
    root = stdlib_dir() if root is None else Path(root)
    parts, used = [], 0
    for rel in stdlib_sources(root):
        data = _read_utf8(root / rel)
        if data is None:
            continue
        if used + len(data) > max_bytes:
            head = data[: max_bytes - used]
            # A cut just after b"\n" never splits a multi-byte UTF-8 character.
            parts.append(head[: head.rfind(b"\n") + 1])
            break
        parts.append(data)
        used += len(data)
    text = b"".join(parts).decode("utf-8")
    if not text:
        raise ValueError(f"no stdlib source text fits in max_bytes={max_bytes} (searched {root})")
    return text


def load_default_corpus(max_bytes=DEFAULT_MAX_BYTES, split=DEFAULT_SPLIT):
    """Character Corpus of default_corpus_text(max_bytes), non-ASCII mapped to one unknown symbol."""
    return load_char_corpus(default_corpus_text(max_bytes), split=split, ascii_only=True)


def _read_utf8(path):
    """File bytes ending in b"\\n", or None if the file is not valid UTF-8 (or unreadable)."""
    try:
        data = path.read_bytes()
        data.decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    return data if data.endswith(b"\n") else data + b"\n"
