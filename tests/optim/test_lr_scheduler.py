"""Learning-rate schedules without torch: hand-written sequences, EpochDecayLR, save / resume, errors."""
import math

import pytest

import disttrain as dt
from disttrain.optim import lr_scheduler as sched


def _opt(lr=1.0, groups=1):
    return dt.optim.SGD([{"params": [dt.zeros(1, requires_grad=True)], "lr": lr * (i + 1)}
                         for i in range(groups)], lr=lr)


def _sequence(scheduler, steps):
    lrs = [scheduler.get_last_lr()[0]]
    for _ in range(steps):
        scheduler.step()
        lrs.append(scheduler.get_last_lr()[0])
    return lrs


def test_zaremba_small_schedule():
    """lr 1, decay 0.5 after epoch 4, 13 epochs: the lr each epoch trains with."""
    opt = _opt(1.0)
    schedule = dt.optim.EpochDecayLR(opt, decay_after_epoch=4, decay=0.5)
    per_epoch = []
    for epoch in range(1, 14):
        per_epoch.append(opt.param_groups[0]["lr"])  # what this epoch's optimizer steps use
        schedule.step()  # end of the epoch
    assert per_epoch == [1, 1, 1, 1, 0.5, 0.25, 0.125, 0.0625, 0.03125, 0.015625, 0.0078125, 0.00390625,
                         0.001953125]
    assert schedule.last_epoch == 13


def test_zaremba_large_schedule_matches_the_closed_form():
    opt = _opt(1.0)
    schedule = dt.optim.EpochDecayLR(opt, decay_after_epoch=14, decay=1 / 1.15)
    for epoch in range(1, 56):
        assert opt.param_groups[0]["lr"] == pytest.approx(1.15 ** -max(0, epoch - 14), rel=1e-13)
        schedule.step()


def test_epoch_decay_from_the_first_epoch():
    assert _sequence(dt.optim.EpochDecayLR(_opt(2.0), decay_after_epoch=0, decay=0.5), 2) == [1.0, 0.5, 0.25]


def test_step_lr_and_exponential_by_hand():
    assert _sequence(dt.optim.StepLR(_opt(1.0), step_size=2, gamma=0.5), 5) == [1, 1, 0.5, 0.5, 0.25, 0.25]
    assert _sequence(dt.optim.ExponentialLR(_opt(1.0), gamma=0.5), 3) == [1, 0.5, 0.25, 0.125]


def test_linear_warmup_by_hand():
    lrs = _sequence(dt.optim.LinearWarmup(_opt(1.0), start_factor=0.25, end_factor=1.0, total_iters=3), 5)
    assert lrs == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0], rel=1e-15)


def test_cosine_by_hand():
    lrs = _sequence(dt.optim.CosineAnnealingLR(_opt(1.0), T_max=4, eta_min=0.0), 8)
    expected = [(1 + math.cos(math.pi * t / 4)) / 2 for t in range(9)]
    assert lrs == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_constructing_records_initial_lr_and_the_optimizer_state_keeps_it():
    opt = _opt(0.3, groups=2)
    dt.optim.StepLR(opt, step_size=1, gamma=0.5)
    assert [g["initial_lr"] for g in opt.param_groups] == [0.3, 0.6]
    assert opt.state_dict()["param_groups"][1]["initial_lr"] == 0.6


def test_scheduler_state_dict_resumes_the_sequence():
    def build(opt):
        warmup = dt.optim.LinearLR(opt, start_factor=0.1, total_iters=4)
        return dt.optim.SequentialLR(opt, [warmup, dt.optim.CosineAnnealingLR(opt, T_max=10)], milestones=[4])

    straight = _sequence(build(_opt(1.0, groups=2)), 12)
    opt = _opt(1.0, groups=2)
    first = build(opt)
    head = _sequence(first, 6)
    saved_sched, saved_opt = first.state_dict(), opt.state_dict()
    opt2 = _opt(1.0, groups=2)
    second = build(opt2)  # construct the scheduler first: construction sets the lrs
    opt2.load_state_dict(saved_opt)
    second.load_state_dict(saved_sched)
    assert head[:-1] + _sequence(second, 6) == straight


def test_lambda_state_dict_leaves_the_functions_out():
    schedule = dt.optim.LambdaLR(_opt(), lambda e: 0.5 ** e)
    schedule.step()
    state = schedule.state_dict()
    assert "lr_lambdas" not in state and "optimizer" not in state and state["last_epoch"] == 1


@pytest.mark.parametrize("build,match", [
    (lambda o: sched.StepLR(o, step_size=0), "step_size .* got 0"),
    (lambda o: sched.CosineAnnealingLR(o, T_max=0), "T_max .* got 0"),
    (lambda o: sched.LinearLR(o, start_factor=0.0), "start_factor .* got 0.0"),
    (lambda o: sched.LinearLR(o, end_factor=1.5), "end_factor .* got 1.5"),
    (lambda o: sched.LinearLR(o, total_iters=0), "total_iters .* got 0"),
    (lambda o: sched.EpochDecayLR(o, decay_after_epoch=-1, decay=0.5), "decay_after_epoch .* got -1"),
    (lambda o: sched.EpochDecayLR(o, decay_after_epoch=4, decay=0.0), "decay must .* got 0.0"),
    (lambda o: sched.LambdaLR(o, [lambda e: 1.0] * 2), "2 lr_lambdas for 1 param groups"),
    (lambda o: sched.SequentialLR(o, [sched.StepLR(o, 2)], milestones=[3]), "1 schedulers need 0 milestones"),
    (lambda o: sched.SequentialLR(o, [sched.StepLR(_opt(), 2)], milestones=[]), "different optimizer"),
    (lambda o: sched.StepLR("not an optimizer", 2), "needs an Optimizer"),
])
def test_bad_arguments_are_named(build, match):
    with pytest.raises((ValueError, TypeError), match=match):
        build(_opt())


@pytest.mark.parametrize("build", [
    lambda opt: [sched.LinearLR(opt, start_factor=0.25, total_iters=4), sched.EpochDecayLR(opt, 2, 0.5)],
    lambda opt: [sched.LambdaLR(opt, lambda epoch: 1 / (1 + epoch))],
    lambda opt: [sched.SequentialLR(opt, [sched.LinearLR(opt, 0.5, total_iters=4), sched.StepLR(opt, 2, 0.5)],
                                    milestones=[6])],
], ids=["warm-up and decay chained", "lambda (from the base lrs)", "sequential (restarts from the base lrs)"])
def test_scale_lr_mid_run_gives_the_lrs_of_a_run_started_from_the_scaled_base(build):
    def run(lr, scale_at=None, steps=9):
        opt = _opt(lr, groups=2)
        schedulers = build(opt)
        seen = []
        for step in range(steps):
            if step == scale_at:
                sched.scale_lr(opt, schedulers, 0.1)
            seen += [g["lr"] for g in opt.param_groups]
            for s in schedulers:
                s.step()
        return seen

    scaled, plain, fresh = run(1.0, scale_at=3), run(1.0), run(0.1)
    assert scaled[:6] == plain[:6]                                      # steps 0-2, two groups each
    assert scaled[6:] == pytest.approx(fresh[6:], rel=1e-12)
    assert len(set(fresh[6:])) > 2                                      # the schedule still moves the lr
