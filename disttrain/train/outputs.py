"""How a run treats the files it writes into its output directory, when writing fails.

    guard = OutputGuard(out_dir, say, last_checkpoint)   # last_checkpoint(): the newest checkpoint, or None
    with guard.needed(path): ...     # a checkpoint, metrics.jsonl, config.toml: an OSError ends the run
    with guard.optional(name): ...   # curves.png, memory.json: an OSError is said once and training goes on
    guard.opened()                   # once out_dir exists; then guard.check_in_place(metrics) before a checkpoint

A file the run cannot go on without raises OutputWriteError naming it, the OS error and the last good
checkpoint still on disk (`disttrain run` turns it into one line and exit status 74). A file it can go on
without is not worth the steps since the last checkpoint. A directory removed or replaced under the run is
noticed before the next checkpoint, which would otherwise go into a directory made anew while the metrics go
to a deleted file.
"""
import contextlib
import os
from pathlib import Path

__all__ = ["OutputGuard", "OutputWriteError"]


class OutputWriteError(RuntimeError):
    """A file the run cannot go on without (a checkpoint, metrics.jsonl, config.toml) could not be written, or the
    output directory was removed under the run. `path`: the file or directory; `errno`: the OS error's number (None
    for a removed directory); `last_checkpoint`: the newest good checkpoint still on disk (a Path) or None."""

    def __init__(self, path, what, errno, last_checkpoint):
        where = (f"the last good checkpoint is {last_checkpoint}" if last_checkpoint is not None
                 else "no checkpoint of this run is on disk")
        super().__init__(f"{what}; {where}")
        self.path, self.errno, self.last_checkpoint = path, errno, last_checkpoint


class OutputGuard:
    """The write-failure rules of one run's output directory (the module docstring)."""

    def __init__(self, out_dir, say, last_checkpoint):
        self.out_dir, self._say, self._last_checkpoint = Path(out_dir), say, last_checkpoint
        self._identity = None          # (st_dev, st_ino) of out_dir once opened: a removed one is noticed
        self._failed_optional = set()  # optional outputs whose failure was said

    @contextlib.contextmanager
    def optional(self, name):
        """Writing out_dir/name, which the run can go on without: an OSError is said once per file, in one line."""
        try:
            yield
        except OSError as exc:
            if name not in self._failed_optional:
                self._failed_optional.add(name)
                path = self.out_dir / name
                via = f" ({exc.filename})" if exc.filename not in (None, str(path)) else ""
                self._say(f"warning: cannot write {path}{via}: {exc.strerror or exc}; training goes on without it")

    @contextlib.contextmanager
    def needed(self, path):
        """Writing `path`, which the run cannot go on without: an OSError becomes OutputWriteError naming it."""
        try:
            yield
        except OSError as exc:
            raise OutputWriteError(exc.filename or path, f"cannot write {exc.filename or path}: "
                                   f"{exc.strerror or exc}", exc.errno, self.checkpoint_on_disk()) from exc

    def opened(self):
        """out_dir exists now: remember which directory it is."""
        self._identity = _identity(self.out_dir)

    def check_in_place(self, metrics, step):
        """Raise OutputWriteError when out_dir was removed, moved or replaced since opened(), or `metrics` (the
        MetricsWriter) writes to a deleted file."""
        try:
            identity = _identity(self.out_dir)
        except FileNotFoundError:
            identity = None
        if identity == self._identity and not metrics.deleted:
            return
        what = ("was removed" if identity is None else "was replaced by another directory"
                if identity != self._identity else f"lost its {Path(metrics.path).name} (deleted)")
        raise OutputWriteError(self.out_dir, f"{self.out_dir} {what} while the run wrote into it; stopped at step "
                               f"{step} without writing a checkpoint", None, self.checkpoint_on_disk())

    def checkpoint_on_disk(self):
        """The newest checkpoint written or restored, when it is still on disk."""
        last = self._last_checkpoint()
        return last if last is not None and Path(last).is_dir() else None


def _identity(path):
    """(device, inode) of a file or directory: a directory removed and made again has another."""
    stat = os.stat(path)
    return stat.st_dev, stat.st_ino
