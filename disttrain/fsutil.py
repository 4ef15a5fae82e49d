"""File-system durability helpers shared by job checkpoints, parameter-server snapshots and run files."""
import contextlib
import os


def fsync_path(path):
    """fsync a file or a directory (a directory's fsync makes a rename inside it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path, data):
    """Replace the file `path` with the bytes `data` durably: a reader sees the old file or the new, never part.
    A write that fails (a full disk) deletes the temporary file it made and raises an OSError naming `path`."""
    path = os.fspath(path)
    temporary = f"{path}.tmp"
    with naming(path):
        fh = open(temporary, "wb")
        try:                                  # from here on the temporary file is ours to delete
            with fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(temporary, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
        fsync_path(os.path.dirname(os.path.abspath(path)))


@contextlib.contextmanager
def naming(path):
    """An OSError raised inside that names no file (a failed write(), fsync() or close()) is made to name `path`,
    so that whoever reports it can say which file could not be written."""
    try:
        yield
    except OSError as exc:
        if exc.filename is None:
            exc.filename = os.fspath(path)
        raise
