"""What a run does with the run directory it finds: continue it, or set it aside.

A run directory belongs to one run. `trainer.resume=auto` continues it only when the new
settings describe the same run: the keys that define it (model, L2A method, data, optimizer,
schedule, batch) must equal those saved in its `config.yaml`, or the resume stops with a one-line
diff (`trainer.resume_override=true` accepts the change). Keys that may change between the
processes of one run (length, intervals, stop step, speed and memory settings, logging, where
checkpoints go) are not compared. `trainer.resume=never` moves everything of the earlier run
(checkpoints, metrics, summary, config, curves, export, wandb files) into one folder beside it,
so nothing of it is lost.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from omegaconf import OmegaConf

from l2a_common import UserError

log = logging.getLogger("l2a_train")

DEFINING = ("model", "l2a", "data", "trainer")
# may change on resume: the run's length and stop, intervals, speed/memory settings, where to resume from
MAY_CHANGE = {
    "trainer.steps", "trainer.stop_at", "trainer.save_every", "trainer.log_every", "trainer.keep_last",
    "trainer.max_bad_steps", "trainer.export_hf", "trainer.resume", "trainer.resume_override",
    "trainer.universal_checkpoint", "trainer.init_from", "trainer.init_optimizer", "trainer.micro_batch_size",
    "trainer.grad_accum", "trainer.grad_checkpointing", "trainer.keep_attention_outputs", "trainer.loss_backend",
    "trainer.dry_run", "trainer.memory_limit_gib", "l2a.backend", "l2a.fused_ops",
}
CONFIG = "config.yaml"
# what an earlier run leaves in its directory (Hydra's train.log stays: it is appended to)
RUN_FILES = ("checkpoints", "metrics.jsonl", "summary.json", CONFIG, "deepspeed_config.json", "curves.png", "hf",
             "wandb")


def _flatten(node, prefix: str = "") -> dict:
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out or {prefix[:-1]: {}}
    return {prefix[:-1]: node}


def changed_settings(saved: dict, new: dict) -> list[str]:
    """`key: old -> new` for every run-defining key that differs (added or removed keys too)."""
    a = {k: v for group in DEFINING for k, v in _flatten(saved.get(group, {}), f"{group}.").items()}
    b = {k: v for group in DEFINING for k, v in _flatten(new.get(group, {}), f"{group}.").items()}
    missing = object()
    diff = []
    for key in sorted(set(a) | set(b)):
        if key in MAY_CHANGE or a.get(key, missing) == b.get(key, missing):
            continue
        diff.append(f"{key}: {a.get(key, '(unset)')} -> {b.get(key, '(unset)')}")
    return diff


def check_same_run(checkpoint: Path, resolved: dict, override: bool) -> None:
    """Stop when the checkpoint's run was started with other run-defining settings."""
    saved_path = Path(checkpoint).parent.parent / CONFIG
    if not saved_path.is_file():
        return  # a run directory from before config.yaml was saved: nothing to compare
    saved = OmegaConf.to_container(OmegaConf.load(saved_path))
    diff = changed_settings(saved, resolved)
    if not diff:
        return
    if override:
        log.warning("trainer.resume_override=true: resuming %s with changed settings: %s", checkpoint, "; ".join(diff))
        return
    raise UserError(
        f"{saved_path.parent} was started with other settings ({'; '.join(diff)}); resuming would mix two runs: "
        "choose another name=, trainer.resume=never to start over (the earlier run is kept aside), or "
        "trainer.resume_override=true to continue with the new settings")


def set_aside(run_dir: Path) -> Path | None:
    """Move an earlier run's files into run_dir/replaced-<time>/; None when there were none."""
    present = [run_dir / name for name in RUN_FILES if (run_dir / name).exists()]
    if not present:
        return None
    aside = run_dir / f"replaced-{time.strftime('%Y%m%d-%H%M%S')}"
    aside.mkdir()
    for path in present:
        path.rename(aside / path.name)
    return aside
