"""When a run saves and stops, decided after every step (`after_step`). Three ways to stop early:

    SIGTERM / SIGUSR1 on any rank   finish the step, save, exit 128 + signum (rerun to resume)
    trainer.stop_at=N               save at step N and end normally (rerun without it to continue)
    trainer.max_bad_steps           too many non-finite steps: save, one-line error (exit 2)

and a checkpoint every `trainer.save_every` steps.
"""

from __future__ import annotations

import signal

from l2a_common import UserError


class StopSignal:
    """SIGTERM / SIGUSR1 -> `received` (the signal number); the step finishes, then the run saves."""

    def __init__(self):
        self.received = 0
        self._previous = {}

    def install(self):
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = signum

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def after_step(state, stats, t, total_steps: int, stop: StopSignal, save, metrics) -> bool:
    """Save and stop as the settings say; True: leave the loop (trainer.stop_at). `save(state)`
    writes a checkpoint of the step just done; `state.status` says how a stop ended the run."""
    step = state.step
    if stats.skipped and state.bad_steps > int(t.max_bad_steps):
        path = save(state)
        state.status = "stopped: non-finite loss"
        raise UserError(f"stopping at step {step}: {state.bad_steps} steps had a non-finite loss or gradients "
                        f"(trainer.max_bad_steps={t.max_bad_steps}); saved {path}; lower trainer.lr or check "
                        "the data, then rerun to resume")
    if stats.stop_requested:
        signum = int(stop.received) or int(signal.SIGTERM)  # another rank's signal: SIGTERM's exit status
        path = save(state)
        state.status = f"stopped by {signal.Signals(signum).name}"
        metrics.write(f"received {signal.Signals(signum).name}: saved {path} at step {step}; "
                      "rerun the same command to resume")
        raise SystemExit(128 + signum)
    if step < total_steps and int(t.save_every) > 0 and step % int(t.save_every) == 0:
        state.last_saved = save(state)
    stop_at = int(t.stop_at) if t.get("stop_at") is not None else None
    if stop_at is not None and step >= stop_at and step < total_steps:
        state.last_saved = save(state)
        state.status = f"stopped at step {step} (trainer.stop_at)"
        metrics.write(f"trainer.stop_at={stop_at}: saved {state.last_saved}; rerun without it to continue")
        return True
    return False
