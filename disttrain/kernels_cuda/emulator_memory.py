"""Device memory for an emulated launch: each array argument copied so that it ends where an
inaccessible page begins.

A kernel that reads or writes past the end of an array then faults at once; the runtime catches
the fault (emulator_runtime.h) and the launch fails naming the argument and the element, where on
the host the access would have touched other memory silently (and on a GPU, at best, raised an
illegal-address error far from its cause). Reads before an array's start are not caught: the copy
starts mid-page.

Arguments that are the same array share one copy (a wrapper may pass a buffer twice, e.g. as an
unread placeholder); arguments that overlap without being the same run on the original memory.
The copies are written back to the arrays the kernel may write (non-const pointers) after a launch
that succeeded.
"""
import ctypes
import ctypes.util
import mmap

import numpy as np

PAGE = mmap.PAGESIZE
PROT_NONE, PROT_READ_WRITE = 0, mmap.PROT_READ | mmap.PROT_WRITE

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_MAP_FAILED = ctypes.c_void_p(-1).value


def _check(result, what):
    if result in (None, _MAP_FAILED) or (isinstance(result, int) and result == -1):
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what} failed for the emulator's guarded copy")
    return result


class GuardedCopy:
    """A copy of `array` whose last byte is followed by an inaccessible page."""

    def __init__(self, array):
        self.array = array
        self.pages = max(1, -(-array.nbytes // PAGE))
        self.size = (self.pages + 1) * PAGE
        self.base = _check(_libc.mmap(None, self.size, PROT_READ_WRITE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0),
                           "mmap")
        self.guard = self.base + self.pages * PAGE
        _check(_libc.mprotect(self.guard, PAGE, PROT_NONE), "mprotect")
        self.address = self.guard - array.nbytes
        buffer = (ctypes.c_char * array.nbytes).from_address(self.address)
        self.copy = np.frombuffer(buffer, dtype=array.dtype).reshape(array.shape)
        self.copy[...] = array

    def element_at(self, address):
        """The flat element index `address` falls in when it is in the guard page, else None."""
        if self.guard <= address < self.guard + PAGE:
            return (address - self.address) // self.array.itemsize
        return None

    def release(self, write_back):
        if write_back:
            self.array[...] = self.copy
        self.copy = None
        _libc.munmap(self.base, self.size)


class GuardedArguments:
    """The pointer arguments of one launch: {argument index: array}, with `writes` the indices the kernel
    may write through. Use as a context manager; `address(k)` is what the kernel receives for argument k."""

    def __init__(self, arrays, writes):
        self._arrays, self._writes = arrays, set(writes)
        self._copies = {}     # span -> GuardedCopy of that memory (one for arguments that are the same array)
        self._users = {}      # span -> the argument indices that use it
        self._addresses = {}  # argument index -> address passed to the kernel
        self.succeeded = False

    def __enter__(self):
        spans = {k: _span(a) for k, a in self._arrays.items()}
        for k, array in self._arrays.items():
            span = spans[k]
            if any(_overlap(span, other) and span != other for other in spans.values()):
                self._addresses[k] = array.ctypes.data  # partial overlap: keep the original memory
                continue
            if span not in self._copies:
                self._copies[span] = GuardedCopy(array)
            self._users.setdefault(span, []).append(k)
            self._addresses[k] = self._copies[span].address
        return self

    def address(self, k):
        return self._addresses[k]

    def describe_fault(self, address):
        """'argument k, element i of n' for an address in a guard page, else None."""
        for span, copy in self._copies.items():
            element = copy.element_at(address)
            if element is not None:
                return (f"argument {self._users[span][0]}: element {element} of an array of {copy.array.size} "
                        "(past its end)")
        return None

    def __exit__(self, *exc):
        for span, copy in self._copies.items():
            copy.release(write_back=self.succeeded and any(k in self._writes for k in self._users[span]))
        return False


def _span(array):
    start = array.ctypes.data
    return start, start + array.nbytes


def _overlap(a, b):
    return a[0] < b[1] and b[0] < a[1]
