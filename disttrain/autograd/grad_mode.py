"""Whether ops record the graph: `no_grad`, `enable_grad`, `set_grad_enabled`.

Per thread, as in PyTorch: a thread that evaluates or updates under no_grad (a parameter server's
serving thread, a data loader) leaves every other thread's mode alone. A thread starts with grad on.
"""
import functools
import threading


class _State(threading.local):
    enabled = True          # each thread's own value once it sets one; this default until then


state = _State()


def is_grad_enabled():
    return state.enabled


class _GradMode:
    """Context manager and decorator: grad mode is `mode` inside, restored on exit."""

    mode = True

    def __enter__(self):
        self.prev = state.enabled
        state.enabled = self.mode
        return self

    def __exit__(self, *exc):
        state.enabled = self.prev
        return False

    def __call__(self, fn):
        mode = self.mode

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            with set_grad_enabled(mode):
                return fn(*args, **kwargs)

        return wrapper


class no_grad(_GradMode):
    """Ops inside do not record the graph: use for evaluation and parameter updates."""

    mode = False


class enable_grad(_GradMode):
    """Ops inside record the graph again (inside a no_grad block)."""

    mode = True


class set_grad_enabled(_GradMode):
    """Set grad mode now (as torch.set_grad_enabled: a plain call switches it), and as a context
    manager restore the previous mode on exit."""

    def __init__(self, mode=True):
        self.mode = bool(mode)
        self.prev = state.enabled
        state.enabled = self.mode

    def __enter__(self):
        return self

    def __call__(self, fn):
        state.enabled = self.prev  # used as a decorator: the mode applies inside calls only
        return super().__call__(fn)
