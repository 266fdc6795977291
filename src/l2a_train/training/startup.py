"""How long `l2a-train` takes to its first step, phase by phase (one log line each).

    clock = StartupClock(enabled=env.is_main)
    with clock.phase("config checks and plan"):
        plan = check_config(cfg, world_size)
    ...
    clock.first_step(seconds)     # the last phase, then "start-up: 41.3 s to the first step (...)"

The first phase of the first run in a process is the time from the process start to `run()`:
the interpreter, the imports and Hydra's config composition.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time

log = logging.getLogger("l2a_train")
_PROCESS_PHASE_REPORTED = False  # a sweep runs several jobs in one process: report it once


def _since_process_start() -> float | None:
    try:
        import psutil  # a dependency of DeepSpeed

        return max(0.0, time.time() - psutil.Process(os.getpid()).create_time())
    except Exception:  # noqa: BLE001  (a missing figure is not worth failing a run for)
        return None


class StartupClock:
    def __init__(self, enabled: bool = True):
        global _PROCESS_PHASE_REPORTED
        self.enabled = enabled
        self.phases: list[tuple[str, float]] = []
        self.done = False
        self.started = time.perf_counter()
        self.before_run = 0.0  # the process phase, when this is the process's first run
        if not _PROCESS_PHASE_REPORTED:
            _PROCESS_PHASE_REPORTED = True
            seconds = _since_process_start()
            if seconds is not None:
                self.before_run = seconds
                self.record("process start, imports, config composition", seconds)

    def record(self, name: str, seconds: float) -> None:
        if self.done:
            return
        self.phases.append((name, seconds))
        if self.enabled:
            log.info("start-up: %s %.1f s", name, seconds)

    @contextlib.contextmanager
    def phase(self, name: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.record(name, time.perf_counter() - started)

    def first_step(self, seconds: float) -> None:
        """The first optimizer step's time, then the one-line summary (wall time, so what no phase
        names is counted too); later calls do nothing."""
        if self.done:
            return
        self.record("first step", seconds)
        self.done = True
        if self.enabled:
            total = self.before_run + time.perf_counter() - self.started
            log.info("start-up: %.1f s to the first step (%s)", total,
                     ", ".join(f"{name} {s:.1f} s" for name, s in self.phases))
