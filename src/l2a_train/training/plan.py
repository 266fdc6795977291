"""The config checks and the plan of a training run: cheap, before any heavy work; each failure
is one line (`l2a_common.UserError`) naming the setting and how to fix it.

    plan = check_config(cfg, world_size)     # TrainPlan: rows per step, grad_accum, seq_len, ...
    memory = memory_plan(cfg, plan, world_size)

Reads the model's config.json (or `model.config`) and the data's manifest.json; opens no data
shard and builds no model, so a bad setting costs a second, not a model load.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from l2a_common import UserError
from l2a_data_prep.tokenizer import has_tokenizer

from ..checkpoint_config import read_config

from . import memory as memory_lib
from .loss import check_backend
from .schedules import check_schedules

log = logging.getLogger("l2a_train")


@dataclass(frozen=True)
class TrainPlan:
    """What the checks decided: the shape of an optimizer step and where the run's inputs are."""

    seq_len: int  # tokens per row (the data's, or data.seq_len for a dry run without data)
    grad_accum: int  # micro-steps per optimizer step
    zero_stage: int
    global_rows: int  # rows per optimizer step, all ranks
    total_steps: int
    data_path: str | None  # None: a dry run's plan without data
    tokenizer: Path | None  # what the HF export ships: the model's own tokenizer, else the data's


def _model_facts(cfg) -> dict:
    """max positions, vocab size and L2A structure of the model the config describes, without building it."""
    model_cfg = cfg.model
    if model_cfg.get("path"):
        base = read_config(model_cfg.path, hint="give a local Hugging Face checkpoint directory (e.g. the output "
                           "of l2a-convert) or model.path=null to build from model.config")
    elif model_cfg.get("config"):
        base = OmegaConf.to_container(model_cfg.config, resolve=True)
    else:
        raise UserError("model.path is null and model.config is empty: give a checkpoint or an architecture")
    is_l2a = str(base.get("model_type", "")).startswith("l2a_")
    types = base.get("l2a_layer_types") if is_l2a else None
    mode = _checkpoint_mode(base) if is_l2a else cfg.l2a.mode
    tokenizer_dir = Path(model_cfg.path) if model_cfg.get("path") and has_tokenizer(model_cfg.path) else None
    return {
        "max_positions": model_cfg.get("max_position_embeddings") or base.get("max_position_embeddings"),
        "rope_changed": model_cfg.get("rope_theta") is not None,
        "vocab_size": base.get("vocab_size"),
        "is_l2a": is_l2a,
        "mode": mode,
        "window": int(base.get("l2a_window", 0)) if is_l2a else int(cfg.l2a.window),
        "windowed": (any(t != "global" for t in types) if types else False) if is_l2a else mode != "full",
        "tokenizer_dir": tokenizer_dir,
    }


def _checkpoint_mode(config: dict) -> str:
    """The l2a.mode an L2A checkpoint was converted with, from its layer types and routing."""
    types = set(config.get("l2a_layer_types") or ["global"])
    if "l2a" in types:
        return "random" if config.get("l2a_routing") == "random" else "l2a"
    return {frozenset({"global"}): "full", frozenset({"swa"}): "swa"}.get(frozenset(types), "static")


# l2a settings that l2a-convert fixes in an L2A checkpoint (the others apply at training time)
FIXED_AT_CONVERSION = ("mode", "layers", "window", "init", "static_every")


def command_line_keys() -> set[str]:
    """Keys (and config groups) set on the command line of this Hydra job, a sweep job's own values
    included; empty outside Hydra."""
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = HydraConfig.get().overrides.task
    except (ImportError, ValueError):
        return set()
    return {o.lstrip("+~").split("=", 1)[0] for o in overrides}


def check_fixed_settings(cfg, facts: dict) -> None:
    """An L2A checkpoint carries its structure: setting it again for training would be ignored,
    so a command line (or a sweep) that sets it differently is an error, not a silent no-op."""
    if not facts["is_l2a"]:
        return
    given = command_line_keys()
    if "l2a" in given:  # a method group (l2a=swa, ...) sets the mode
        given.add("l2a.mode")
    now = {"window": facts["window"], "mode": facts["mode"]}
    for key in FIXED_AT_CONVERSION:
        if f"l2a.{key}" not in given or (key in now and cfg.l2a[key] == now[key]):
            continue
        fixed = f" ({key} {now[key]})" if key in now else ""
        raise UserError(
            f"l2a.{key}={cfg.l2a[key]}: model.path={cfg.model.path} is an L2A checkpoint whose {key} was fixed when "
            f"l2a-convert converted it{fixed}; convert the base model again with that setting, or train from the base "
            "model (model.path=<base checkpoint>), which is converted with the l2a settings of the run")


def check_config(cfg, world_size: int) -> TrainPlan:
    """Validate the settings; returns the plan. Reads config.json and the data's manifest, opens no
    shard and builds nothing."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    planning_only = bool(cfg.trainer.dry_run) and missing == ["data.path"] and cfg.data.get("seq_len")
    if missing and not planning_only:
        raise UserError(f"required setting(s) not given: {', '.join(missing)}; set them on the command line, "
                        "e.g. data.path=/data/my-corpus model.path=/models/my-l2a-checkpoint")
    t = cfg.trainer
    if int(t.steps) < 1:
        raise UserError(f"trainer.steps={t.steps}: need at least 1 optimizer step")
    if not 0 <= int(t.warmup_steps) < int(t.steps):
        raise UserError(f"trainer.warmup_steps={t.warmup_steps} must be >= 0 and below trainer.steps={t.steps}")
    micro = int(t.micro_batch_size)
    if micro < 1:
        raise UserError(f"trainer.micro_batch_size={micro}: need at least 1 row per GPU per micro-step")
    if t.get("global_batch_size"):
        gbs = int(t.global_batch_size)
        if gbs % (micro * world_size):
            raise UserError(f"trainer.global_batch_size={gbs} is not a multiple of micro_batch_size x world size = "
                            f"{micro} x {world_size}; choose a global batch of {micro * world_size * max(1, gbs // (micro * world_size))}")
        grad_accum = gbs // (micro * world_size)
    else:
        grad_accum = int(t.grad_accum)
    if grad_accum < 1:
        raise UserError(f"trainer.grad_accum={grad_accum}: need at least 1 micro-step per optimizer step")
    reg = cfg.l2a.regularizer
    check_schedules(t.lr_schedule, reg.schedule)
    if float(reg.lambda_max) < 0:
        raise UserError(f"l2a.regularizer.lambda_max={reg.lambda_max} must be >= 0")
    if t.precision not in ("bf16", "fp32"):
        raise UserError(f"trainer.precision='{t.precision}': choose bf16 or fp32")
    stage = int(cfg.deepspeed.zero_optimization.stage)
    if stage not in (0, 1, 2, 3):
        raise UserError(f"deepspeed.zero_optimization.stage={stage}: DeepSpeed ZeRO stages are 0, 1, 2, 3")
    if int(t.keep_last) < 1 or int(t.save_every) < 0 or int(t.max_bad_steps) < 0:
        raise UserError("trainer.keep_last must be >= 1, trainer.save_every and trainer.max_bad_steps >= 0")
    check_backend(t.loss_backend)
    if t.resume not in ("auto", "never") and not Path(str(t.resume)).exists():
        raise UserError(f"trainer.resume={t.resume}: no such checkpoint; use auto, never or a checkpoint path")
    if t.get("init_from") and not Path(str(t.init_from)).exists():
        raise UserError(f"trainer.init_from={t.init_from} does not exist; give a checkpoint of an earlier run")
    if t.get("stop_at") is not None and int(t.stop_at) < 1:
        raise UserError(f"trainer.stop_at={t.stop_at}: give a step >= 1 (or null)")
    if t.profile_step is not None and not 1 <= int(t.profile_step) <= int(t.steps):
        raise UserError(f"trainer.profile_step={t.profile_step}: give an optimizer step from 1 to trainer.steps={t.steps} "
                        "(or null)")
    keep = t.keep_attention_outputs
    if not isinstance(keep, bool) and not (isinstance(keep, int) and keep >= 1):
        raise UserError(f"trainer.keep_attention_outputs={keep!r}: give true (every layer), false (none) or a number "
                        "of layers >= 1 (the last N keep theirs)")
    if keep and not t.grad_checkpointing:
        raise UserError(f"trainer.keep_attention_outputs={str(keep).lower()} only applies with trainer.grad_checkpointing=true "
                        "(without checkpointing nothing is recomputed); enable checkpointing or drop the setting")

    facts = _model_facts(cfg)
    shape = dict(grad_accum=grad_accum, zero_stage=stage, global_rows=micro * grad_accum * world_size,
                 total_steps=int(t.steps))
    if planning_only:  # trainer.dry_run without data: the memory plan for data.seq_len
        return TrainPlan(seq_len=int(cfg.data.seq_len), data_path=None, tokenizer=None, **shape)

    from ..data import check_tokenizer_matches, manifest_tokenizer_path, read_manifest  # raises UserError naming the path

    manifest = read_manifest(cfg.data.path, seq_len=cfg.data.get("seq_len"))
    seq_len = int(manifest["seq_len"])
    if facts["max_positions"] and seq_len > int(facts["max_positions"]):
        raise UserError(
            f"rows of {seq_len} tokens exceed the model's max_position_embeddings={facts['max_positions']}; "
            f"to extend the context set model.max_position_embeddings={seq_len} and a larger model.rope_theta "
            "(the paper uses 5.0e6 for 32K -> 128K)")
    if facts["max_positions"] and model_max_changed(cfg) and not facts["rope_changed"]:
        log.warning("model.max_position_embeddings changed but model.rope_theta not: positions beyond the "
                    "original context may be poorly modelled")
    check_fixed_settings(cfg, facts)
    if facts["tokenizer_dir"] is not None:
        check_tokenizer_matches(cfg.model.path, {"data.path": cfg.data.path}, bool(cfg.data.allow_tokenizer_mismatch))
    data_vocab = int(manifest.get("tokenizer", {}).get("vocab_size") or 0)
    if facts["vocab_size"] and data_vocab > int(facts["vocab_size"]):
        raise UserError(f"data.path={cfg.data.path} was tokenized with {data_vocab} token ids but the model has "
                        f"vocab_size={facts['vocab_size']}; prepare the data with the model's tokenizer")
    if facts["windowed"] and facts["window"] >= seq_len:
        raise UserError(f"l2a.window={facts['window']} is not smaller than the rows' {seq_len} tokens: sliding-window "
                        f"attention would already see everything; choose l2a.window below {seq_len}")
    # the export ships the model's own tokenizer; a model built from a config has only the data's
    tokenizer = facts["tokenizer_dir"] or Path(manifest_tokenizer_path(cfg.data.path, manifest))
    return TrainPlan(seq_len=seq_len, data_path=str(cfg.data.path), tokenizer=tokenizer, **shape)


def memory_plan(cfg, plan: TrainPlan, world_size: int) -> memory_lib.MemoryPlan:
    """The predicted memory per GPU of this run (l2a_train.training.memory), from config facts alone."""
    from ..model.convert import BASE_CONFIGS

    base, is_l2a = memory_lib.base_config(cfg.model, BASE_CONFIGS)
    return memory_lib.plan(cfg, memory_lib.shape_of(base, cfg.l2a, is_l2a), plan.seq_len, world_size)


def experiment_applied() -> str:
    """Which recipe this run's settings come from, to say so on start."""
    try:
        from hydra.core.hydra_config import HydraConfig

        name = HydraConfig.get().runtime.choices.get("experiment")
    except (ImportError, ValueError):
        return "settings as composed"
    if name in (None, "null"):
        return "no experiment: the defaults of configs/train.yaml and its groups"
    return f"experiment={name}: configs/experiment/{name}.yaml"


def model_max_changed(cfg) -> bool:
    return cfg.model.get("max_position_embeddings") is not None
