"""Test-only fault injection, imported by every Python started with this directory on PYTHONPATH.

Rank 1 of an mpiexec job (PMI_RANK=1) raises in its third optimizer step when DISTTRAIN_TEST_FAIL is
"always", or "once" while the file DISTTRAIN_TEST_FAIL_MARKER does not exist yet (the failure creates it).
With DISTTRAIN_TEST_FAIL = "disk_full", rank 0 (which writes the outputs) finds the disk full from its second
checkpoint on: each file of it fails with ENOSPC.
"""
import errno
import os
from pathlib import Path


def _install():
    mode, marker = os.environ.get("DISTTRAIN_TEST_FAIL"), Path(os.environ.get("DISTTRAIN_TEST_FAIL_MARKER", "x"))
    if mode == "disk_full" and os.environ.get("PMI_RANK") == "0":
        _fill_the_disk_after_one_checkpoint()
    if os.environ.get("PMI_RANK") != "1" or mode not in ("once", "always") or (mode == "once" and marker.exists()):
        return
    from disttrain import optim

    original, calls = optim.Adam.step, []

    def failing_step(self, closure=None):
        calls.append(1)
        if len(calls) == 3:
            marker.write_text("failed")
            raise FloatingPointError("injected failure in rank 1's third optimizer step")
        return original(self, closure)

    optim.Adam.step = failing_step


def _fill_the_disk_after_one_checkpoint():
    from disttrain.train import saving

    original, checkpoints = saving._write_file, set()

    def full_disk(path, data):
        checkpoints.add(path.parent)
        if len(checkpoints) > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return original(path, data)

    saving._write_file = full_disk


_install()
