"""File-system durability helpers shared by job checkpoints and parameter-server snapshots."""
import os


def fsync_path(path):
    """fsync a file or a directory (a directory's fsync makes a rename inside it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
