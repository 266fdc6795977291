"""Fault injection for the tests, from the environment variable L2A_FAULT (unset in production):

    L2A_FAULT="kill_in_save:2"   SIGKILL in the middle of the second checkpoint write
    L2A_FAULT="sigterm_at:3"     rank 0 sends itself SIGTERM after the micro-batches of step 3
    L2A_FAULT="nan_at:2,3"       the loss of steps 2 and 3 is NaN
    (several: "nan_at:2;kill_in_save:1")

`install(step, checkpointer, env)` wraps the methods these faults need on those two objects and
does nothing when L2A_FAULT is unset: the trainer's own code never asks whether a fault is on.
"""

from __future__ import annotations

import os
import signal



def parse(spec: str) -> dict[str, set[int]]:
    out: dict[str, set[int]] = {}
    for part in spec.split(";"):
        name, _, values = part.partition(":")
        if name.strip() and values:
            out.setdefault(name.strip(), set()).update(int(v) for v in values.split(",") if v.strip())
    return out


def fault_steps(kind: str) -> set[int]:
    """The steps (or save counts) of one kind of fault in L2A_FAULT."""
    return parse(os.environ.get("L2A_FAULT", "")).get(kind, set())


def install(step, checkpointer, env) -> None:
    """Wrap `step.micro_batch` / `step.accumulate` (a TrainStep) and `checkpointer.write` for the
    faults L2A_FAULT asks for; nothing when it is unset."""
    faults = parse(os.environ.get("L2A_FAULT", ""))
    if faults.get("nan_at"):
        _nan_losses(step, faults["nan_at"])
    if faults.get("sigterm_at") and env.is_main:
        _sigterm_after(step, faults["sigterm_at"])
    if faults.get("kill_in_save"):
        _kill_in_save(checkpointer, faults["kill_in_save"])


def _nan_losses(step, steps: set[int]) -> None:
    original = step.micro_batch

    def micro_batch(at_step, *args, **kwargs):
        loss, lm_sum, *rest = original(at_step, *args, **kwargs)
        if at_step + 1 in steps:  # a non-finite loss
            loss, lm_sum = loss * float("nan"), lm_sum * float("nan")
        return (loss, lm_sum, *rest)

    step.micro_batch = micro_batch


def _sigterm_after(step, steps: set[int]) -> None:
    original = step.accumulate

    def accumulate(at_step, *args, **kwargs):
        sums = original(at_step, *args, **kwargs)
        if at_step + 1 in steps:  # a scheduler's SIGTERM, before the step reads its stop flag
            os.kill(os.getpid(), signal.SIGTERM)
        return sums

    step.accumulate = accumulate


def _kill_in_save(checkpointer, counts: set[int]) -> None:
    original = checkpointer.write
    saves = [0]

    def write(*args, **kwargs):
        out = original(*args, **kwargs)
        saves[0] += 1
        if saves[0] in counts:  # die with the files written but the checkpoint not committed
            os.kill(os.getpid(), signal.SIGKILL)
        return out

    checkpointer.write = write
