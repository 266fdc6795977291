"""What a run does with the run directory it finds: continue it, or set it aside.

A run directory belongs to one run. `trainer.resume=auto` continues it only when the new
settings describe the same run: the keys that define it (model, L2A method, data, optimizer,
schedule, batch) must equal those saved in its `config.yaml`, or the resume stops with a one-line
diff (`trainer.resume_override=true` accepts the change). Keys that may change between the
processes of one run (length, intervals, stop step, speed and memory settings, logging, where
checkpoints go) are not compared. `trainer.resume=never` moves everything of the earlier run
(checkpoints, metrics, summary, config, curves, export, wandb files) into one folder beside it,
so nothing of it is lost.

`plan_resume` decides where a run starts from (its own latest checkpoint, a given one, another
run's weights with `trainer.init_from`, or nothing) and whether that checkpoint needs DeepSpeed's
universal conversion (another world size); `convert_universal` does the conversion once.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from l2a_common import UserError

from . import checkpoints as ckpt_lib
from . import distributed as dist_utils

log = logging.getLogger("l2a_train")

DEFINING = ("model", "l2a", "data", "trainer")
# may change on resume: the run's length and stop, intervals, speed/memory settings, where to resume from
MAY_CHANGE = {
    "trainer.steps", "trainer.stop_at", "trainer.save_every", "trainer.log_every", "trainer.keep_last",
    "trainer.max_bad_steps", "trainer.export_hf", "trainer.save_final", "trainer.profile_step", "trainer.resume", "trainer.resume_override",
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


@dataclass(frozen=True)
class ResumePlan:
    resume_path: Path | None  # this run's checkpoint to continue (step, data, RNG, optimizer)
    init_path: Path | None  # trainer.init_from: another run's weights (and optimizer); a fresh start
    universal: bool  # load through DeepSpeed's universal conversion of the source
    resume_state: dict | None  # trainer_state.json of resume_path

    @property
    def source(self) -> Path | None:
        return self.resume_path or self.init_path


def plan_resume(cfg, plan, env, checkpointer, resolved: dict) -> ResumePlan:
    """Where this run starts from, checked before anything is built (all ranks call it)."""
    t = cfg.trainer
    run_dir = checkpointer.dir.parent
    if t.resume == "auto":
        resume_path = checkpointer.latest()
        check_not_finished_without_checkpoint(run_dir, resume_path)
    elif t.resume == "never":
        resume_path = None
        if env.is_main:  # keep the earlier run's files, out of the way
            aside = set_aside(run_dir)
            if aside is not None:
                log.warning("trainer.resume=never: moved the earlier run's files to %s", aside)
        dist_utils.barrier()
    else:
        resume_path = ckpt_lib.resolve_checkpoint(t.resume, "trainer.resume")
    if resume_path is not None:
        check_same_run(resume_path, resolved, bool(t.resume_override))
    resume_state = ckpt_lib.read_state(resume_path) if resume_path else None
    init_path = None
    if resume_path is None and t.get("init_from"):  # a new stage: another run's weights (and optimizer)
        init_path = ckpt_lib.resolve_checkpoint(t.init_from, "trainer.init_from")
    source = resume_path or init_path
    universal = False
    if source is not None:
        source_state = ckpt_lib.read_state(source)
        weights_only = init_path is not None and not t.init_optimizer
        how = ckpt_lib.load_plan(source_state, env.world_size, plan.zero_stage, weights_only)
        saved = (f"{source} was saved with world size {source_state.get('world_size')} and ZeRO stage "
                 f"{source_state.get('zero_stage')}, this run has world size {env.world_size} and ZeRO stage "
                 f"{plan.zero_stage}")
        if how == "unsupported":
            raise UserError(f"{saved}: DeepSpeed cannot convert that; relaunch with the saved ZeRO stage "
                            f"(deepspeed=zero{source_state.get('zero_stage')}), or start a new run from its weights "
                            f"with model.path={source.parent.parent / 'hf'} (the run's Hugging Face export)")
        if how == "universal" and not t.universal_checkpoint:
            raise UserError(f"{saved}; relaunch with the saved world size, or set trainer.universal_checkpoint=true "
                            "to convert it (DeepSpeed universal checkpoint)")
        universal = how == "universal"
    return ResumePlan(resume_path, init_path, universal, resume_state)


def check_not_finished_without_checkpoint(run_dir: Path, resume_path: Path | None) -> None:
    """A run that finished without a checkpoint of its last step (trainer.save_final=false) cannot be
    resumed: trainer.resume=auto would train its tail, or all of it, again and overwrite its results."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return
    if summary.get("status") != "done":
        return
    last = ckpt_lib.read_state(resume_path)["step"] if resume_path is not None else 0
    if last < int(summary.get("steps") or 0):
        raise UserError(
            f"{run_dir} holds a finished run of {summary['steps']} steps whose last checkpoint is "
            f"{'at step ' + str(last) if resume_path is not None else 'none'} (trainer.save_final=false): resuming "
            "would train it again; use trainer.resume=never to start over (its files are moved aside) or another name"
        )


def convert_universal(source: Path, checkpointer, env) -> None:
    """DeepSpeed's universal conversion of `source`, on rank 0; its error reaches every rank."""
    error = None
    if env.is_main:
        try:
            ckpt_lib.convert_to_universal(source, checkpointer.universal_path(source))
        except UserError as err:
            error = str(err)
    error = dist_utils.broadcast_object(error)
    if error:
        raise UserError(error)
