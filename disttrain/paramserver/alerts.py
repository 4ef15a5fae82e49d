"""What a server must tell its operator, not only its log: lines marked with ALERT_PREFIX.

A server writes them into its log like any other line; `ps-cluster` follows the servers' logs and shows every
marked line on its terminal (cluster.py), and a server started by hand shows them on its error output. Failed
snapshots are reported through SnapshotFailures: the first failure, then at most one line an interval with the
count of those in between, and one line when a snapshot is written again, so a full disk neither goes unseen nor
floods the terminal.
"""
import time

from disttrain.paramserver.throttle import Throttle

__all__ = ["ALERT_PREFIX", "SNAPSHOT_ALERT_INTERVAL_S", "SnapshotFailures", "os_error_text", "kept_text"]

ALERT_PREFIX = "[alert] "
SNAPSHOT_ALERT_INTERVAL_S = 60.0


def os_error_text(exc):
    """The OS's words for an OSError ("No space left on device"), else the exception's text."""
    return exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or type(exc).__name__


class SnapshotFailures:
    """alert(text) about server `who`'s failed periodic snapshots: failed(...) after each failure, written(path)
    after each snapshot written."""

    def __init__(self, alert, who, interval=SNAPSHOT_ALERT_INTERVAL_S, clock=time.monotonic):
        self._alert, self._who = alert, who
        self._throttle = Throttle(interval, clock)
        self.failures = 0          # in a row, since the last snapshot written

    def failed(self, path, exc, updates, kept):
        """A snapshot to `path` failed with `exc` at `updates` updates; `kept`: the updates the last good snapshot
        holds (None: there is none)."""
        self.failures += 1
        passed = self._throttle.let_through()
        if passed is None:
            return
        held, since = passed
        more = f" ({held + 1} failures in the last {since:.0f} s)" if since is not None else ""
        self._alert(f"{self._who}: snapshot {path} FAILED: {os_error_text(exc)}{more}; {kept_text(kept, updates)} "
                    f"(a crash now loses the others); it tries again at every due snapshot")

    def written(self, path):
        if self.failures:
            self._alert(f"{self._who}: snapshot {path} written again, after {self.failures} failed")
        self.failures = 0
        self._throttle.reset()


def kept_text(kept, updates):
    """What the last good snapshot holds of the `updates` applied, in words."""
    if kept is None:
        return f"it has no snapshot of its {updates} updates"
    return f"its last good snapshot holds {kept} of its {updates} updates"
