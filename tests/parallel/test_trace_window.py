"""Traces: step spans, a window of steps, labelled evaluation spans (no MPI needed)."""
import json

import pytest

from disttrain import trace


@pytest.fixture(autouse=True)
def fresh_position():
    yield
    trace._state.step = trace._state.phase = None


def spans(tracer, tmp_path):
    doc = json.loads(tracer.write(tmp_path / "t.json").read_text())
    return [(e["name"], e["cat"]) for e in doc["traceEvents"] if e["ph"] == "X"]


def test_a_window_keeps_its_steps_and_the_evaluations_after_them(tmp_path):
    tracer = trace.Tracer(steps=(2, 3))
    with trace.tracing(tracer):
        with trace.span("start-up broadcast"):
            pass
        for step in range(1, 6):
            trace.set_step(step)
            with trace.span("forward", step=step):
                pass
            if step % 3 == 0:
                with trace.phase("eval valid"):
                    with trace.span("forward"):
                        pass
    got = spans(tracer, tmp_path)
    assert [name for name, lane in got if lane == "steps"] == ["step 2", "step 3"]
    assert [name for name, lane in got if lane == "compute"] == ["forward", "forward", "eval valid: forward",
                                                                  "eval valid"]


def test_without_a_window_every_span_is_kept_and_evaluation_is_labelled(tmp_path):
    tracer = trace.Tracer()
    with trace.tracing(tracer):
        with trace.phase("eval test"):
            trace.record("allreduce", tracer.origin, tracer.origin + 1e-3, lane="comm")
        trace.set_step(1)
        with trace.span("forward"):
            pass
    assert spans(tracer, tmp_path) == [("eval test: allreduce", "comm"), ("eval test", "compute"),
                                       ("forward", "compute"), ("step 1", "steps")]


def test_where_the_run_is():
    assert trace.where() == "start-up"
    trace.set_step(4)
    assert trace.where() == "step 4"
    with trace.phase("eval valid"):
        assert trace.where() == "eval valid after step 4"


@pytest.mark.parametrize("text", ["3:2", "0:4", "2", "a:b", "2:"])
def test_bad_step_windows_are_refused(text):
    with pytest.raises(ValueError, match="expected A:B"):
        trace.parse_steps(text)
    assert trace.parse_steps("100:110") == (100, 110)
