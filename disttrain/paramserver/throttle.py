"""Throttle: at most one of a kind of event passes an interval, and the ones held back are counted, so a
server's reports (refused messages, failed snapshots) neither go unseen nor flood a log or a terminal."""
import time

__all__ = ["Throttle"]


class Throttle:
    """let_through() -> None when held back, else (events held back since the last one let through, seconds
    since it or None for the first)."""

    def __init__(self, interval, clock=time.monotonic):
        self._interval, self._clock = interval, clock
        self.reset()

    def let_through(self):
        now = self._clock()
        if self._last is not None and now - self._last < self._interval:
            self._held += 1
            return None
        passed = (self._held, None if self._last is None else now - self._last)
        self._last, self._held = now, 0
        return passed

    def reset(self):
        """Forget the last event: the next one passes."""
        self._last, self._held = None, 0
