"""Child processes that end with the process that started them (standard library only).

    subprocess.Popen(cmd, start_new_session=True, preexec_fn=end_with_parent(os.getpid()))

A child in a session of its own (so that a Ctrl-C in the terminal reaches its parent alone, which passes it on
once) outlives a parent killed by SIGKILL: a parameter server would wait for workers forever, holding its port,
and an mpiexec job would train on with nobody watching for its failures. On Linux the kernel sends such a child
SIGTERM when the parent dies (prctl PR_SET_PDEATHSIG), which every disttrain process answers as a stop by hand:
a checkpoint or a snapshot first, then exit.
"""
import ctypes
import os
import signal
import sys

__all__ = ["end_with_parent"]

_PR_SET_PDEATHSIG = 1          # linux/prctl.h


def end_with_parent(parent):
    """A preexec_fn for subprocess.Popen that has the kernel send the child SIGTERM when `parent` (a pid, the
    caller's own) dies; None outside Linux. prctl is looked up here, in the parent: between fork and exec the
    child runs only the call."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def set_death_signal():
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:          # the parent died before the call: nothing would signal this child
            os.kill(os.getpid(), signal.SIGTERM)

    return set_death_signal
