"""LR and regularizer schedules: shapes, end points, and that they are pure functions of the step."""

import math

import pytest

from l2a_common import UserError
from l2a_train.training.schedules import check_schedules, lambda_at, lr_at


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_lr_warmup_then_decay(schedule):
    kw = dict(base_lr=1.0, warmup_steps=4, total_steps=20, schedule=schedule, min_lr_ratio=0.1)
    lrs = [lr_at(s, **kw) for s in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4] == pytest.approx(1.0)
    if schedule == "constant":
        assert all(lr == 1.0 for lr in lrs[4:])
    else:
        assert lrs[-1] == pytest.approx(0.1)
        assert all(a >= b - 1e-12 for a, b in zip(lrs[4:], lrs[5:]))  # non-increasing after warmup
    if schedule == "cosine":
        mid = 4 + (20 - 4 - 1) / 2
        assert lr_at(int(mid), **kw) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (int(mid) - 4) / 15)))


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_lambda_zero_in_warmup_and_reaches_max_at_last_step(schedule):
    kw = dict(lambda_max=2.0, warmup_steps=5, total_steps=15, schedule=schedule)
    lams = [lambda_at(s, **kw) for s in range(15)]
    assert lams[:5] == [0.0] * 5
    assert lams[-1] == pytest.approx(2.0)
    assert all(a <= b + 1e-12 for a, b in zip(lams, lams[1:]))
    if schedule == "linear":
        assert lams[5] == pytest.approx(0.2)


def test_pure_functions_of_step():
    kw = dict(base_lr=3e-4, warmup_steps=2, total_steps=9, schedule="cosine", min_lr_ratio=0.0)
    assert [lr_at(s, **kw) for s in range(9)] == [lr_at(s, **kw) for s in range(9)]
    assert lr_at(50, **kw) == pytest.approx(0.0)  # past the end stays at the floor


def test_unknown_schedule_is_one_line_naming_the_setting():
    check_schedules("cosine", "linear")
    with pytest.raises(UserError, match=r"trainer.lr_schedule='step': choose one of cosine, linear, constant"):
        check_schedules("step", "linear")
    with pytest.raises(UserError, match=r"l2a.regularizer.schedule='step': choose one of constant, linear, cosine"):
        check_schedules("cosine", "step")
