"""A timeline of named spans per rank, written as a Chrome trace (JSON, opens in Perfetto / chrome://tracing).

    tracer = trace.Tracer(rank=comm.rank)
    trace.set_tracer(tracer)
    with trace.span("forward"):
        ...
    tracer.write("run.trace.json", comm)        # rank 0 writes every rank's spans into one file

Anything may record spans through the module-level `span(...)` / `record(...)`; with no tracer installed
they cost one attribute lookup and do nothing. DataParallel records each bucket's allreduce on the "comm"
lane, from the moment it is started to the moment its completion is observed, so the overlap with the
"compute" lane (forward, backward, optimizer step) shows directly.

Chrome trace layout: one process per rank (pid = rank, named "rank r"), one thread per lane (tid 0 =
"compute", tid 1 = "comm", further lanes numbered in order of first use); spans are complete events
(ph "X") with microsecond `ts` and `dur`.

NOTE: timestamps are time.perf_counter() relative to an origin each rank takes right after a barrier
(`Tracer.start(comm)`), so ranks line up to within the barrier's exit skew (microseconds on one machine,
tens of microseconds across a network). This module uses only the standard library: every layer may
import it.
"""
import contextlib
import json
import time
from pathlib import Path

__all__ = ["Tracer", "span", "record", "now", "get_tracer", "set_tracer", "tracing"]

now = time.perf_counter

_NO_SPAN = contextlib.nullcontext()


class Tracer:
    """Collects complete spans (name, lane, start, end, args) for one rank."""

    def __init__(self, rank=0):
        self.rank = rank
        self.origin = now()
        self.spans = []           # (name, lane, start, end, args) with perf_counter seconds
        self.lanes = {"compute": 0, "comm": 1}

    def start(self, comm=None):
        """Reset the origin (after a barrier on `comm`, so all ranks share it) and drop earlier spans."""
        if comm is not None:
            comm.Barrier()
        self.origin = now()
        self.spans.clear()

    @contextlib.contextmanager
    def span(self, name, lane="compute", **args):
        begin = now()
        try:
            yield
        finally:
            self.spans.append((name, lane, begin, now(), args))

    def record(self, name, begin, end, lane="compute", **args):
        """Add a span whose start and end (perf_counter seconds) were measured elsewhere."""
        self.spans.append((name, lane, begin, end, args))

    def events(self):
        """This rank's spans as Chrome trace events (plus the metadata naming the process and lanes)."""
        pid = self.rank
        out = [{"name": "process_name", "ph": "M", "pid": pid, "tid": 0, "args": {"name": f"rank {pid}"}},
               {"name": "process_sort_index", "ph": "M", "pid": pid, "tid": 0, "args": {"sort_index": pid}}]
        for name, lane, begin, end, args in self.spans:
            tid = self.lanes.setdefault(lane, len(self.lanes))
            event = {"name": name, "ph": "X", "pid": pid, "tid": tid, "cat": lane,
                     "ts": round((begin - self.origin) * 1e6, 3), "dur": round((end - begin) * 1e6, 3)}
            if args:
                event["args"] = args
            out.append(event)
        for lane, tid in self.lanes.items():
            out.append({"name": "thread_name", "ph": "M", "pid": pid, "tid": tid, "args": {"name": lane}})
        return out

    def write(self, path, comm=None):
        """Write every rank's events into one JSON file on rank 0 (a collective when `comm` is given).

        Returns the path on the rank that wrote it, None on the others. Gathering pickles the events:
        this runs once at the end of a run, never on a hot path.
        """
        events = self.events()
        if comm is not None and comm.size > 1:
            gathered = comm.gather_object(events, root=0)
            if comm.rank != 0:
                return None
            events = [e for rank_events in gathered for e in rank_events]
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"traceEvents": events, "displayTimeUnit": "ms"}), encoding="utf-8")
        return path


class _State:
    tracer = None


_state = _State()


def get_tracer():
    """The installed Tracer, or None."""
    return _state.tracer


def set_tracer(tracer):
    """Install `tracer` (None switches tracing off); returns the previous one."""
    previous, _state.tracer = _state.tracer, tracer
    return previous


@contextlib.contextmanager
def tracing(tracer):
    """Install `tracer` for the duration of a with-block."""
    previous = set_tracer(tracer)
    try:
        yield tracer
    finally:
        set_tracer(previous)


def span(name, lane="compute", **args):
    """A context manager recording a span on the installed tracer (a shared no-op when none is)."""
    tracer = _state.tracer
    if tracer is None:
        return _NO_SPAN
    return tracer.span(name, lane, **args)


def record(name, begin, end, lane="compute", **args):
    """Record a span measured elsewhere on the installed tracer, if any."""
    tracer = _state.tracer
    if tracer is not None:
        tracer.record(name, begin, end, lane, **args)
