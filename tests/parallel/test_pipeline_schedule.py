"""Pipeline schedules as pure lists: completeness, dependencies, no deadlock, in-flight bounds, bubble."""
import pytest

from disttrain.parallel.pipeline.schedule import (Action, ScheduleDeadlock, max_in_flight, simulate,
                                                  stage_actions)

SIZES = [(1, 1), (1, 4), (2, 1), (2, 2), (2, 8), (3, 5), (4, 2), (4, 4), (4, 8), (5, 16)]


@pytest.mark.parametrize("kind", ["gpipe", "1f1b"])
@pytest.mark.parametrize("stages,micro", SIZES)
def test_every_micro_batch_gets_one_forward_then_one_backward(kind, stages, micro):
    for k in range(stages):
        actions = stage_actions(kind, stages, micro, k)
        assert sorted(actions) == sorted([Action("F", m) for m in range(micro)] + [Action("B", m) for m in range(micro)])
        for m in range(micro):
            assert actions.index(Action("F", m)) < actions.index(Action("B", m))
        # micro-batches enter and leave in order on every stage (the channels rely on it)
        assert [a.micro_batch for a in actions if a.kind == "F"] == list(range(micro))
        assert [a.micro_batch for a in actions if a.kind == "B"] == list(range(micro))


@pytest.mark.parametrize("kind", ["gpipe", "1f1b"])
@pytest.mark.parametrize("stages,micro", SIZES)
def test_all_stages_together_finish_with_the_theoretical_bubble(kind, stages, micro):
    result = simulate(kind, stages, micro, forward_cost=1, backward_cost=2)
    # equal stages: the step takes (M + K - 1) forward+backward slots
    assert result["makespan"] == pytest.approx(3 * (micro + stages - 1))
    assert result["bubble"] == pytest.approx((stages - 1) / (micro + stages - 1))
    for k, spans in enumerate(result["timeline"]):
        assert [a for a, _, _ in spans] == stage_actions(kind, stages, micro, k)


@pytest.mark.parametrize("stages,micro", SIZES)
def test_in_flight_bounds(stages, micro):
    for k in range(stages):
        assert max_in_flight(stage_actions("gpipe", stages, micro, k)) == micro
        assert max_in_flight(stage_actions("1f1b", stages, micro, k)) == min(stages - k, micro) <= stages


def test_1f1b_shape_on_a_middle_stage():
    assert repr(stage_actions("1f1b", 4, 6, 1)) == "[F0, F1, F2, B0, F3, B1, F4, B2, F5, B3, B4, B5]"
    assert repr(stage_actions("1f1b", 4, 6, 3)) == "[F0, B0, F1, B1, F2, B2, F3, B3, F4, B4, F5, B5]"


def test_a_bad_pairing_is_reported_as_a_deadlock(monkeypatch):
    import disttrain.parallel.pipeline.schedule as schedule

    def backwards_first(kind, stages, micro, stage):      # the last stage waits for a backward nobody sends
        actions = stage_actions(kind, stages, micro, stage)
        return actions[::-1] if stage == stages - 1 else actions

    monkeypatch.setattr(schedule, "stage_actions", backwards_first)
    with pytest.raises(ScheduleDeadlock, match="wait on each other"):
        simulate("gpipe", 2, 2)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="unknown pipeline schedule 'zigzag'"):
        stage_actions("zigzag", 2, 2, 0)
    with pytest.raises(ValueError, match="stage=2"):
        stage_actions("gpipe", 2, 2, 2)
