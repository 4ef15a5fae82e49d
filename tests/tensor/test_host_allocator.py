"""retain_freed_memory: when it steps aside, and that a step's big arrays stop faulting in fresh pages."""
import ctypes
import subprocess
import sys
import textwrap

import pytest

from disttrain.tensor.host_allocator import _user_chose_allocator, retain_freed_memory


def _is_glibc():
    try:
        return hasattr(ctypes.CDLL(None), "gnu_get_libc_version")
    except OSError:
        return False


@pytest.mark.parametrize("environ", [
    {"DISTTRAIN_HOST_ALLOCATOR": "system"},
    {"MALLOC_MMAP_THRESHOLD_": "131072"},
    {"MALLOC_TRIM_THRESHOLD_": "0"},
    {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"},
    {"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"},
])
def test_a_users_own_malloc_choice_is_left_alone(environ):
    assert _user_chose_allocator(environ)
    assert retain_freed_memory(environ) is False


def test_no_choice_in_the_environment_is_not_mistaken_for_one():
    assert not _user_chose_allocator({"GLIBC_TUNABLES": "glibc.rtld.optional_static_tls=2048",
                                      "LD_PRELOAD": "libfaketime.so", "DISTTRAIN_HOST_ALLOCATOR": "cached"})


# A training step's pattern: two 16 MB arrays alive at once (the logits and their softmax), then freed.
# Its minor page faults per step, in a fresh process (mallopt is process-wide: not in pytest's own).
_STEP_FAULTS = textwrap.dedent("""
    import resource, sys
    import numpy as np
    from disttrain.tensor.host_allocator import retain_freed_memory
    if sys.argv[1] == "retain":
        assert retain_freed_memory({}), "mallopt refused the settings"
    x = np.ones((400, 200), np.float32)
    w = np.ones((10000, 200), np.float32)
    def step():
        logits = x @ w.T
        softmax = np.empty_like(logits)
        np.exp(logits, out=softmax)
    step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        step()
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
""")


def _faults_per_step(mode):
    done = subprocess.run([sys.executable, "-c", _STEP_FAULTS, mode], capture_output=True, text=True, check=True)
    return float(done.stdout)


@pytest.mark.skipif(not _is_glibc(), reason="glibc's mallopt only")
def test_retained_memory_serves_the_next_step_without_page_faults():
    retained = _faults_per_step("retain")
    system = _faults_per_step("system")
    # one 16 MB array is 4,096 pages of 4 KiB: the system malloc faults in most of them again each step
    assert retained < 50, f"{retained} page faults per step with freed memory retained"
    assert system > 10 * max(retained, 1), f"system malloc: {system} faults per step, retained: {retained}"
