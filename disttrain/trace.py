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

Where the run is: the training loop calls `set_step(n)` as step n starts, and wraps work that is not a
training step in `phase(...)` (evaluation: `with trace.phase("eval valid"):`). A tracer then draws one
"step n" span per step on the "steps" lane (from the start of step n to the start of step n+1, so its
evaluation and checkpoint are inside) and names every span recorded inside a phase "<phase>: <name>"
("eval valid: forward"), so evaluation spans are told apart from training ones. `Tracer(steps=(a, b))`
records only steps a..b (evaluations after step b included; nothing before step a, start-up included).
`where()` says the same in words ("step 12", "eval valid after step 50") for messages such as the
communication watchdog's.

NOTE: timestamps are time.perf_counter() relative to an origin each rank takes right after a barrier
(`Tracer.start(comm)`), so ranks line up to within the barrier's exit skew (microseconds on one machine,
tens of microseconds across a network). This module uses only the standard library: every layer may
import it.
"""
import contextlib
import json
import time
from pathlib import Path

__all__ = ["Tracer", "span", "record", "now", "get_tracer", "set_tracer", "tracing", "set_step", "current_step",
           "phase", "where", "parse_steps"]

now = time.perf_counter

_NO_SPAN = contextlib.nullcontext()


class Tracer:
    """Collects complete spans (name, lane, start, end, args) for one rank.

    steps: None (record everything) or (first, last), the window of training steps to record, inclusive.
    """

    def __init__(self, rank=0, steps=None):
        self.rank = rank
        self.origin = now()
        self.spans = []           # (name, lane, start, end, args) with perf_counter seconds
        self.lanes = {"compute": 0, "comm": 1}
        self.steps = steps
        self.active = steps is None
        self._step_started = None     # (step, perf_counter) of the step span in progress

    def at_step(self, step):
        """Step `step` starts: close the last step's span, start this one's, and follow the window."""
        t = now()
        if self._step_started is not None and self.active:
            last, begin = self._step_started
            self.spans.append((f"step {last}", "steps", begin, t, {}))
        self.active = self.steps is None or self.steps[0] <= step <= self.steps[1]
        self._step_started = (step, t)

    def finish(self):
        """Close the span of the step in progress (before writing)."""
        if self._step_started is not None and self.active:
            last, begin = self._step_started
            self.spans.append((f"step {last}", "steps", begin, now(), {}))
        self._step_started = None

    def start(self, comm=None):
        """Reset the origin (after a barrier on `comm`, so all ranks share it) and drop earlier spans."""
        if comm is not None:
            comm.Barrier(what="start of tracing")
        self.origin = now()
        self.spans.clear()

    @contextlib.contextmanager
    def span(self, name, lane="compute", **args):
        begin = now()
        try:
            yield
        finally:
            self.record(name, begin, now(), lane, **args)

    def record(self, name, begin, end, lane="compute", **args):
        """Add a span whose start and end (perf_counter seconds) were measured elsewhere."""
        if self.active:
            label = _state.phase
            self.spans.append((f"{label}: {name}" if label else name, lane, begin, end, args))

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

        Returns the path on the rank that wrote it, None on the others. Gathering encodes the events (msgpack):
        this runs once at the end of a run, never on a hot path.
        """
        self.finish()
        events = self.events()
        if comm is not None and comm.size > 1:
            gathered = comm.gather_object(events, root=0, what="gather of trace spans")
            if comm.rank != 0:
                return None
            events = [e for rank_events in gathered for e in rank_events]
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"traceEvents": events, "displayTimeUnit": "ms"}), encoding="utf-8")
        return path


class _State:
    tracer = None
    step = None        # the training step in progress (1-based), None before the first
    phase = None       # e.g. "eval valid" while an evaluation runs


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
    """A context manager recording a span on the installed tracer (a shared no-op when none is, or when the
    tracer's step window excludes the current step)."""
    tracer = _state.tracer
    if tracer is None or not tracer.active:
        return _NO_SPAN
    return tracer.span(name, lane, **args)


def record(name, begin, end, lane="compute", **args):
    """Record a span measured elsewhere on the installed tracer, if any."""
    tracer = _state.tracer
    if tracer is not None:
        tracer.record(name, begin, end, lane, **args)


def set_step(step):
    """Training step `step` (1-based) starts now: the installed tracer draws step spans and follows its window."""
    _state.step = step
    if _state.tracer is not None:
        _state.tracer.at_step(step)


def current_step():
    """The training step in progress (None before the first)."""
    return _state.step


@contextlib.contextmanager
def phase(name):
    """Work that is not part of a training step (e.g. "eval valid"): one span named `name` around it, and every
    span recorded inside is named "<name>: <span>"."""
    previous, _state.phase = _state.phase, name
    begin = now()
    try:
        yield
    finally:
        _state.phase = previous
        if _state.tracer is not None:
            _state.tracer.record(name, begin, now())


def where():
    """Where the run is, in words: "step 12", "eval valid after step 50", "eval valid", or "start-up"."""
    step, label = _state.step, _state.phase
    if label:
        return f"{label} after step {step}" if step else label
    return f"step {step}" if step else "start-up"


def parse_steps(text):
    """"A:B" -> (A, B), the window of training steps to trace (1 <= A <= B); ValueError naming the text."""
    first, colon, last = str(text).partition(":")
    try:
        window = (int(first), int(last)) if colon else None
    except ValueError:
        window = None
    if window is None or not 1 <= window[0] <= window[1]:
        raise ValueError(f"--trace-steps {text!r}: expected A:B, the first and last training step to trace "
                         "(1 <= A <= B), e.g. 100:110")
    return window
