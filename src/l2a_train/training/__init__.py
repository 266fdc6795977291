"""The trainer behind `l2a-train` (`run`) and what it uses: process group, the model and its
loss as one module, schedules, run checkpoints and resume, memory plan, metrics, sweep summaries."""

from .run import check_config, run

__all__ = ["run", "check_config"]
