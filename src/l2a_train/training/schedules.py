"""Learning-rate and regularizer schedules: pure functions of the optimizer step.

Nothing here has state, so a resumed run gets exactly the values the uninterrupted run would
have had, and no scheduler needs to be checkpointed. `step` counts optimizer steps from 0;
`total_steps` is the length of the run.

    lr_at(step, base_lr=5e-5, warmup_steps=209, total_steps=3973, schedule="cosine", min_lr_ratio=0.1)
    lambda_at(step, lambda_max=1e-8, warmup_steps=209, total_steps=3973, schedule="linear")

The schedule names are checked once, at start-up, by `check_schedules` (the trainer's plan).
"""

from __future__ import annotations

import math

from l2a_common import UserError

_LR_DECAY = {  # 1 -> 0 as the decay's progress goes 0 -> 1
    "cosine": lambda p: 0.5 * (1.0 + math.cos(math.pi * p)),
    "linear": lambda p: 1.0 - p,
}
_LAMBDA_RAMP = {  # 0 -> 1 as the ramp's progress goes 0 -> 1
    "linear": lambda p: p,
    "cosine": lambda p: 0.5 * (1.0 - math.cos(math.pi * p)),
}
LR_SCHEDULES = (*_LR_DECAY, "constant")
LAMBDA_SCHEDULES = ("constant", *_LAMBDA_RAMP)


def check_schedules(lr_schedule: str, lambda_schedule: str) -> None:
    """The one check of the schedule names, as the settings that choose them."""
    if lr_schedule not in LR_SCHEDULES:
        raise UserError(f"trainer.lr_schedule='{lr_schedule}': choose one of {', '.join(LR_SCHEDULES)}")
    if lambda_schedule not in LAMBDA_SCHEDULES:
        raise UserError(f"l2a.regularizer.schedule='{lambda_schedule}': choose one of {', '.join(LAMBDA_SCHEDULES)}")


def lr_at(step: int, *, base_lr: float, warmup_steps: int, total_steps: int, schedule: str,
          min_lr_ratio: float) -> float:
    """Linear warmup to base_lr over `warmup_steps`, then decay to base_lr * min_lr_ratio at the last step."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return base_lr
    decay_steps = max(1, total_steps - warmup_steps - 1)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    min_lr = base_lr * min_lr_ratio
    return min_lr + (base_lr - min_lr) * _LR_DECAY[schedule](progress)


def lambda_at(step: int, *, lambda_max: float, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """Regularizer weight: 0 during LR warmup, then constant / linear / cosine ramp to lambda_max at the last step."""
    if step < warmup_steps:
        return 0.0
    if schedule == "constant":
        return lambda_max
    progress = min(1.0, (step - warmup_steps + 1) / max(1, total_steps - warmup_steps))
    return lambda_max * _LAMBDA_RAMP[schedule](progress)
