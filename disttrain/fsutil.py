"""File-system durability helpers shared by job checkpoints, parameter-server snapshots and run files."""
import os


def fsync_path(path):
    """fsync a file or a directory (a directory's fsync makes a rename inside it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path, data):
    """Replace the file `path` with the bytes `data` durably: a reader sees the old file or the new, never part."""
    path = os.fspath(path)
    temporary = f"{path}.tmp"
    with open(temporary, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(temporary, path)
    fsync_path(os.path.dirname(os.path.abspath(path)))
