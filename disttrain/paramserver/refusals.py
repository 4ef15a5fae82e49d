"""The server's log of the messages it refuses: the first, then at most one an interval, each with the reason
and the peer it came from; the others are counted and the count goes with the next line logged, so a flood of
bad messages (a buggy or hostile peer) cannot flood the log, and the server's rate line counts them all."""
import time

MAX_REASON_CHARS = 300     # a reason may quote what the peer sent


class RefusalLog:
    """log(text) a refusal now and then: refused(peer, code, reason) at most once every `interval` seconds."""

    def __init__(self, log, who, interval, clock=time.monotonic):
        self._log, self._who, self._interval, self._clock = log, who, interval, clock
        self._logged_at = None
        self._unlogged = 0

    def refused(self, peer, code, reason):
        now = self._clock()
        if self._logged_at is not None and now - self._logged_at < self._interval:
            self._unlogged += 1
            return
        if len(reason) > MAX_REASON_CHARS:
            reason = reason[:MAX_REASON_CHARS] + "..."
        more = (f" ({self._unlogged} more refused since the last one logged, in {now - self._logged_at:.0f} s)"
                if self._unlogged else "")
        self._log(f"{self._who}: refused a message from peer {peer.hex()}: {code}: {reason}{more}")
        self._logged_at, self._unlogged = now, 0
