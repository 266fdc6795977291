"""Learning-rate and regularizer schedules: pure functions of the optimizer step.

Nothing here has state, so a resumed run gets exactly the values the uninterrupted run would
have had, and no scheduler needs to be checkpointed. `step` counts optimizer steps from 0;
`total_steps` is the length of the run.

    lr_at(step, base_lr=5e-5, warmup_steps=209, total_steps=3973, schedule="cosine", min_lr_ratio=0.1)
    lambda_at(step, lambda_max=1e-8, warmup_steps=209, total_steps=3973, schedule="linear")
"""

from __future__ import annotations

import math

LR_SCHEDULES = ("cosine", "linear", "constant")
LAMBDA_SCHEDULES = ("constant", "linear", "cosine")


def lr_at(step: int, *, base_lr: float, warmup_steps: int, total_steps: int, schedule: str = "cosine",
          min_lr_ratio: float = 0.0) -> float:
    """Linear warmup to base_lr over `warmup_steps`, then decay to base_lr * min_lr_ratio at the last step."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown lr schedule {schedule!r}: one of {', '.join(LR_SCHEDULES)}")
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return base_lr
    decay_steps = max(1, total_steps - warmup_steps - 1)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    min_lr = base_lr * min_lr_ratio
    if schedule == "linear":
        return base_lr + (min_lr - base_lr) * progress
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lambda_at(step: int, *, lambda_max: float, warmup_steps: int, total_steps: int,
              schedule: str = "linear") -> float:
    """Regularizer weight: 0 during LR warmup, then constant / linear / cosine ramp to lambda_max at the last step."""
    if schedule not in LAMBDA_SCHEDULES:
        raise ValueError(f"unknown regularizer schedule {schedule!r}: one of {', '.join(LAMBDA_SCHEDULES)}")
    if step < warmup_steps:
        return 0.0
    if schedule == "constant":
        return lambda_max
    progress = min(1.0, (step - warmup_steps + 1) / max(1, total_steps - warmup_steps))
    if schedule == "linear":
        return lambda_max * progress
    return lambda_max * 0.5 * (1.0 - math.cos(math.pi * progress))
