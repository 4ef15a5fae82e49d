"""Whether ops record the graph: `no_grad`, `enable_grad`, `set_grad_enabled`.

A plain module-level flag rather than a thread-local: the engine and every op read it on the
hot path, and disttrain runs autograd on one thread per process (communication threads never
build graphs).
"""
import functools


class _State:
    enabled = True


state = _State()


def is_grad_enabled():
    return state.enabled


class set_grad_enabled:
    """Context manager (and decorator) that sets grad mode on entry and restores it on exit."""

    def __init__(self, mode=True):
        self.mode = bool(mode)
        self.prev = None

    def __enter__(self):
        self.prev = state.enabled
        state.enabled = self.mode
        return self

    def __exit__(self, *exc):
        state.enabled = self.prev
        return False

    def __call__(self, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            with type(self)(self.mode) if type(self) is set_grad_enabled else type(self)():
                return fn(*args, **kwargs)

        return wrapper


class no_grad(set_grad_enabled):
    """Ops inside do not record the graph: use for evaluation and parameter updates."""

    def __init__(self):
        super().__init__(False)


class enable_grad(set_grad_enabled):
    def __init__(self):
        super().__init__(True)
