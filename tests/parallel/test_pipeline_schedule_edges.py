"""Pipeline schedule helpers on inputs the schedules themselves never produce: max_in_flight on any action list,
simulate with its default costs (from mutation testing: these survived the schedule tests)."""
import pytest

from disttrain.parallel.pipeline.schedule import Action, max_in_flight, simulate


def actions(text):
    return [Action(word[0], int(word[1:])) for word in text.split()]


@pytest.mark.parametrize("text,most", [
    ("", 0),
    ("F0 B0 F1 F2", 2),                 # the peak comes after a backward
    ("F0 F1 B0 B1 F2 F3 F4", 3),
    ("F0 B0 F1 B1", 1),
])
def test_max_in_flight_counts_forwards_not_yet_backwarded(text, most):
    assert max_in_flight(actions(text)) == most


def test_simulate_costs_a_forward_1_and_a_backward_2_by_default():
    default, explicit = simulate("gpipe", 2, 3), simulate("gpipe", 2, 3, forward_cost=1, backward_cost=2)
    assert default["makespan"] == explicit["makespan"] == 3 * (3 + 2 - 1)
    assert default["bubble"] == explicit["bubble"]


def test_simulate_charges_forwards_and_backwards_their_own_costs():
    result = simulate("1f1b", 2, 2, forward_cost=1, backward_cost=5)
    for spans in result["timeline"]:
        for action, start, end in spans:
            assert end - start == (1 if action.kind == "F" else 5), (action, start, end)


def test_a_deadlock_after_one_stage_finished_names_only_the_stuck_stages(monkeypatch):
    import disttrain.parallel.pipeline.schedule as schedule
    plain = schedule.stage_actions

    def last_stage_waits_forever(kind, stages, micro, stage):      # a forward nobody upstream ever makes
        actions = plain(kind, stages, micro, stage)
        return actions + [Action("F", 99)] if stage == stages - 1 else actions

    monkeypatch.setattr(schedule, "stage_actions", last_stage_waits_forever)
    with pytest.raises(schedule.ScheduleDeadlock, match=r"at \{1: F99\}$"):
        simulate("gpipe", 2, 2)
