"""Live processes by their command line, for tests of processes a test did not start itself (a launcher's)."""
from pathlib import Path


def live_processes(*words):
    """PIDs of live processes whose command line has each of `words` as a whole argument or inside one."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and all(any(str(word).encode() in arg for arg in argv) for word in words):
            pids.append(int(entry.name))
    return pids
