"""Test-only fault injection, imported by every Python started with this directory on PYTHONPATH.

Rank 1 of an mpiexec job (PMI_RANK=1) raises in its third optimizer step when DISTTRAIN_TEST_FAIL is
"always", or "once" while the file DISTTRAIN_TEST_FAIL_MARKER does not exist yet (the failure creates it).
"""
import os
from pathlib import Path


def _install():
    mode, marker = os.environ.get("DISTTRAIN_TEST_FAIL"), Path(os.environ.get("DISTTRAIN_TEST_FAIL_MARKER", "x"))
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


_install()
