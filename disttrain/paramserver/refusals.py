"""The server's log of the messages it refuses: the first, then at most one an interval, each with the reason
and the peer it came from; the others are counted and the count goes with the next line logged, so a flood of
bad messages (a buggy or hostile peer) cannot flood the log, and the server's rate line counts them all."""
import time

from disttrain.paramserver.throttle import Throttle

MAX_REASON_CHARS = 300     # a reason may quote what the peer sent


class RefusalLog:
    """log(text) a refusal now and then: refused(peer, code, reason) at most once every `interval` seconds."""

    def __init__(self, log, who, interval, clock=time.monotonic):
        self._log, self._who = log, who
        self._throttle = Throttle(interval, clock)

    def refused(self, peer, code, reason):
        passed = self._throttle.let_through()
        if passed is None:
            return
        held, since = passed
        if len(reason) > MAX_REASON_CHARS:
            reason = reason[:MAX_REASON_CHARS] + "..."
        more = f" ({held} more refused since the last one logged, in {since:.0f} s)" if held else ""
        self._log(f"{self._who}: refused a message from peer {peer.hex()}: {code}: {reason}{more}")
