"""What `l2a-train` does: continued pretraining of an L2A model with DeepSpeed.

    l2a-train experiment=quickstart                      # the quickstart's tiny run
    l2a-train experiment=qwen3_8b_128k model.path=... data.path=...
    torchrun --nproc_per_node=8 -m l2a_train.cli.train experiment=...
    l2a-train -m experiment=... l2a.regularizer.lambda_max=1e-8,1e-7 trainer.lr=2e-5,5e-5   # a sweep

Read top to bottom: `run(cfg)` checks the config, sets up the process group, the data, the
model and the DeepSpeed engine, restores a checkpoint if there is one, then loops over
optimizer steps. One step:

    lr, lambda  <- pure functions of the step (schedules.py)
    for each micro-batch:  hidden, R = model(ids)                         # routing seeded by the micro-step
                           loss = CE(hidden @ lm_head) / tokens + lambda R   # fused, no full logits
                           engine.backward(loss); engine.step()            # the last one updates
    metrics (two small all-reduces), NaN/Inf check, checkpoint every N steps / on SIGTERM or SIGUSR1

The LM loss is normalised by the number of target tokens of the whole global batch (all ranks
and micro-steps), so the update does not depend on how the batch is split across processes.

Everything else lives in small modules of this package: distributed.py (process group),
engine.py (the model and its loss as one module), loss.py (fused cross-entropy), schedules.py,
checkpoints.py (atomic save / exact resume / HF export), resume.py (same run or set aside),
memory.py (the memory plan), metrics.py (metrics.jsonl, wandb, progress bar, MFU), sweep.py
(summaries); `l2a_train.curves` draws curves.png.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import signal
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from l2a_common import UserError
from l2a_data_prep.tokenizer import has_tokenizer

from . import checkpoints as ckpt_lib
from . import distributed as dist_utils
from . import memory as memory_lib
from . import resume as resume_lib
from .engine import CausalLMWithLoss
from .loss import next_token_labels
from .metrics import FlopsCounter, MetricsLogger, peak_flops, peak_memory_gib, summarize_routing
from .schedules import LAMBDA_SCHEDULES, LR_SCHEDULES, lambda_at, lr_at
from .sweep import write_run_summary

log = logging.getLogger("l2a_train")

# ---------------------------------------------------------------------------------------------
# Config checks: cheap, before any heavy work; each failure is one line (l2a_common.UserError)


def _model_facts(cfg) -> dict:
    """max positions, vocab size and L2A structure of the model the config describes, without building it."""
    model_cfg = cfg.model
    if model_cfg.get("path"):
        path = Path(model_cfg.path)
        if not (path / "config.json").is_file():
            what = "does not exist" if not path.exists() else "has no config.json"
            raise UserError(f"model.path={path} {what}; give a local Hugging Face checkpoint directory "
                            "(e.g. the output of l2a-convert) or model.path=null to build from model.config")
        base = json.loads((path / "config.json").read_text())
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


def check_config(cfg, world_size: int) -> dict:
    """Validate the settings; returns the plan (rows per step, grad_accum, seq_len, ...)."""
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
    if t.lr_schedule not in LR_SCHEDULES:
        raise UserError(f"trainer.lr_schedule='{t.lr_schedule}': choose one of {', '.join(LR_SCHEDULES)}")
    reg = cfg.l2a.regularizer
    if reg.schedule not in LAMBDA_SCHEDULES:
        raise UserError(f"l2a.regularizer.schedule='{reg.schedule}': choose one of {', '.join(LAMBDA_SCHEDULES)}")
    if float(reg.lambda_max) < 0:
        raise UserError(f"l2a.regularizer.lambda_max={reg.lambda_max} must be >= 0")
    if t.precision not in ("bf16", "fp32"):
        raise UserError(f"trainer.precision='{t.precision}': choose bf16 or fp32")
    stage = int(cfg.deepspeed.zero_optimization.stage)
    if stage not in (0, 1, 2, 3):
        raise UserError(f"deepspeed.zero_optimization.stage={stage}: DeepSpeed ZeRO stages are 0, 1, 2, 3")
    if int(t.keep_last) < 1 or int(t.save_every) < 0 or int(t.max_bad_steps) < 0:
        raise UserError("trainer.keep_last must be >= 1, trainer.save_every and trainer.max_bad_steps >= 0")
    if t.loss_backend not in ("auto", "liger", "chunked"):
        raise UserError(f"trainer.loss_backend='{t.loss_backend}': choose auto, liger or chunked")
    if t.resume not in ("auto", "never") and not Path(str(t.resume)).exists():
        raise UserError(f"trainer.resume={t.resume}: no such checkpoint; use auto, never or a checkpoint path")
    if t.get("init_from") and not Path(str(t.init_from)).exists():
        raise UserError(f"trainer.init_from={t.init_from} does not exist; give a checkpoint of an earlier run")
    if t.get("stop_at") is not None and int(t.stop_at) < 1:
        raise UserError(f"trainer.stop_at={t.stop_at}: give a step >= 1 (or null)")
    if t.get("keep_attention_outputs") and not t.grad_checkpointing:
        raise UserError("trainer.keep_attention_outputs=true only applies with trainer.grad_checkpointing=true "
                        "(without checkpointing nothing is recomputed); enable checkpointing or drop the setting")

    facts = _model_facts(cfg)
    if planning_only:  # trainer.dry_run without data: the memory plan for data.seq_len
        return {"dataset": None, "seq_len": int(cfg.data.seq_len), "grad_accum": grad_accum, "zero_stage": stage,
                "global_rows": micro * grad_accum * world_size, "tokenizer": None}

    from ..data import PackedDataset, check_tokenizer_matches  # raises UserError naming the path

    dataset = PackedDataset(cfg.data.path, seq_len=cfg.data.get("seq_len"))
    seq_len = dataset.seq_len
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
    data_vocab = int(dataset.manifest.get("tokenizer", {}).get("vocab_size") or 0)
    if facts["vocab_size"] and data_vocab > int(facts["vocab_size"]):
        raise UserError(f"data.path={cfg.data.path} was tokenized with {data_vocab} token ids but the model has "
                        f"vocab_size={facts['vocab_size']}; prepare the data with the model's tokenizer")
    if facts["windowed"] and facts["window"] >= seq_len:
        raise UserError(f"l2a.window={facts['window']} is not smaller than the rows' {seq_len} tokens: sliding-window "
                        f"attention would already see everything; choose l2a.window below {seq_len}")
    # the export ships the model's own tokenizer; a model built from a config has only the data's
    tokenizer = facts["tokenizer_dir"] or Path(dataset.tokenizer_path)
    return {"dataset": dataset, "seq_len": seq_len, "grad_accum": grad_accum, "zero_stage": stage,
            "global_rows": micro * grad_accum * world_size, "tokenizer": tokenizer}


def memory_plan(cfg, plan: dict, world_size: int) -> memory_lib.MemoryPlan:
    """The predicted memory per GPU of this run (l2a_train.training.memory), from config facts alone."""
    from ..model.convert import BASE_CONFIGS

    base, is_l2a = memory_lib.base_config(cfg.model, BASE_CONFIGS)
    return memory_lib.plan(cfg, memory_lib.shape_of(base, cfg.l2a, is_l2a), plan["seq_len"], world_size)


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


def deepspeed_config(cfg, grad_accum: int, load_universal: bool) -> dict:
    """The `deepspeed/` group as a resolved dict, plus what the trainer decides (precision, logging)."""
    ds = OmegaConf.to_container(cfg.deepspeed, resolve=True)
    ds["gradient_accumulation_steps"] = grad_accum
    ds.setdefault("bf16", {})["enabled"] = cfg.trainer.precision == "bf16"
    ds.setdefault("steps_per_print", 2**31 - 1)  # we log ourselves
    ds.setdefault("wall_clock_breakdown", False)
    if load_universal:
        ds.setdefault("checkpoint", {})["load_universal"] = True
    return ds


def run_directory(cfg) -> Path:
    """Hydra's output directory (a sweep job's own), or cfg.run_dir when called without Hydra."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except (ImportError, ValueError):
        return Path(cfg.run_dir)


# ---------------------------------------------------------------------------------------------
# Signals: SIGTERM / SIGUSR1 -> finish the step, save, exit


class StopSignal:
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


# ---------------------------------------------------------------------------------------------


def run(cfg: DictConfig) -> dict:
    """Train as configured; returns the run summary (also written to <run dir>/summary.json)."""
    # 1. config checks, process group, run directory --------------------------------------
    env = dist_utils.world()
    plan = check_config(cfg, env.world_size)
    t = cfg.trainer
    grad_accum, zero_stage, dataset = plan["grad_accum"], plan["zero_stage"], plan["dataset"]
    total_steps = int(t.steps)
    memory = memory_plan(cfg, plan, env.world_size)
    device_bytes = memory_lib.device_memory(cfg, env.device)
    if env.is_main:
        log.info("%s", memory.markdown(device_bytes))
    if t.dry_run:
        return {"status": "dry run", "predicted_peak_gib": memory.total / memory_lib.GIB,
                "memory_plan": {k: v / memory_lib.GIB for k, v in memory.terms.items()}}
    memory.check(device_bytes)

    _quiet_libraries(env.rank)
    env = dist_utils.init_distributed()
    if env.device.type == "cpu":
        torch.set_flush_denormal(True)  # denormal floats in early training slow CPU steps down up to 10x
    run_dir = run_directory(cfg)
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    dist_utils.barrier()
    checkpointer = ckpt_lib.Checkpointer(run_dir, t.keep_last, env)

    # 2. what to resume from --------------------------------------------------------------
    resolved = OmegaConf.to_container(cfg, resolve=True)
    if t.resume == "auto":
        resume_path = checkpointer.latest()
    elif t.resume == "never":
        resume_path = None
        if env.is_main:  # keep the earlier run's files, out of the way
            aside = resume_lib.set_aside(run_dir)
            if aside is not None:
                log.warning("trainer.resume=never: moved the earlier run's files to %s", aside)
        dist_utils.barrier()
    else:
        resume_path = ckpt_lib.resolve_checkpoint(t.resume, "trainer.resume")
    if resume_path is not None:
        resume_lib.check_same_run(resume_path, resolved, bool(t.resume_override))
    resume_state = ckpt_lib.read_state(resume_path) if resume_path else None
    init_path = None
    if resume_path is None and t.get("init_from"):  # a new stage: another run's weights (and optimizer)
        init_path = ckpt_lib.resolve_checkpoint(t.init_from, "trainer.init_from")
    source = resume_path or init_path
    universal = False
    if source is not None:
        source_state = ckpt_lib.read_state(source)
        weights_only = init_path is not None and not t.init_optimizer
        how = ckpt_lib.load_plan(source_state, env.world_size, zero_stage, weights_only)
        saved = (f"{source} was saved with world size {source_state.get('world_size')} and ZeRO stage "
                 f"{source_state.get('zero_stage')}, this run has world size {env.world_size} and ZeRO stage {zero_stage}")
        if how == "unsupported":
            raise UserError(f"{saved}: DeepSpeed cannot convert that; relaunch with the saved ZeRO stage "
                            f"(deepspeed=zero{source_state.get('zero_stage')}), or start a new run from its weights "
                            f"with model.path={source.parent.parent / 'hf'} (the run's Hugging Face export)")
        if how == "universal" and not t.universal_checkpoint:
            raise UserError(f"{saved}; relaunch with the saved world size, or set trainer.universal_checkpoint=true "
                            "to convert it (DeepSpeed universal checkpoint)")
        universal = how == "universal"
    if universal:
        error = None
        if env.is_main:
            try:
                ckpt_lib.convert_to_universal(source, checkpointer.universal_path(source))
            except UserError as err:
                error = str(err)
        error = dist_utils.broadcast_object(error)
        if error:
            raise UserError(error)

    # 3. data, model, engine --------------------------------------------------------------
    ckpt_lib.seed_everything(int(t.seed))
    from ..data import PackedLoader

    loader = PackedLoader(dataset, micro_batch_size=int(t.micro_batch_size), rank=env.rank,
                          world_size=env.world_size, seed=int(t.seed), shuffle=bool(cfg.data.shuffle))

    import deepspeed

    from ..model import apply_trainable, build_model
    from ..model.checkpointing import enable_checkpointing

    model = build_model(cfg.model, cfg.l2a)
    n_trainable = apply_trainable(model, cfg.l2a.trainable)
    model.config.use_cache = False
    if t.grad_checkpointing:
        enable_checkpointing(model, keep_attention=bool(t.keep_attention_outputs))
    flops = FlopsCounter(model)
    layer_types = list(getattr(model.config, "l2a_layer_types", None) or ["global"] * model.config.num_hidden_layers)
    module = CausalLMWithLoss(model, t.loss_backend, zero_stage)
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "router" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": float(t.weight_decay)}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=float(t.lr), betas=tuple(t.betas), eps=float(t.eps), fused=env.device.type == "cuda")
    ds_config = deepspeed_config(cfg, grad_accum, universal)
    engine, optimizer, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=ds_config)
    plain_optimizer = zero_stage == 0 and t.precision != "bf16"  # DeepSpeed steps our AdamW directly

    # 4. restore ---------------------------------------------------------------------------
    step, tokens_seen, bad_steps, elapsed, wandb_id = 0, 0, 0, 0.0, None
    if resume_path is not None:
        state, rank_state = checkpointer.load(engine, resume_path, universal)
        step, tokens_seen = int(state["step"]), int(state["tokens_seen"])
        elapsed, wandb_id = float(state.get("elapsed_s", 0.0)), state.get("wandb_id")  # bad steps: a new budget
        loader.load_state_dict(rank_state["data"])
        log.info("resumed from %s at step %d (%d tokens seen)", resume_path, step, tokens_seen)
    elif init_path is not None:
        checkpointer.load_weights(engine, init_path, with_optimizer=bool(t.init_optimizer), universal=universal)
        log.info("initialised from %s (%s); step, schedule and data start fresh", init_path,
                 "weights and optimizer" if t.init_optimizer else "weights")

    if env.is_main:
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        (run_dir / "deepspeed_config.json").write_text(json.dumps(ds_config, indent=2) + "\n")
        log.info("run %s (%s): %d processes, %d rows x %d tokens per step (micro %d x accum %d x world %d), "
                 "%.1fM trainable parameters, ZeRO-%d, %s", run_dir, experiment_applied(), env.world_size,
                 plan["global_rows"], plan["seq_len"], t.micro_batch_size, grad_accum, env.world_size,
                 n_trainable / 1e6, zero_stage, t.precision)
    metrics = MetricsLogger(run_dir, enabled=env.is_main, total_steps=total_steps, start_step=step,
                            run_name=str(cfg.name), config=resolved, logger_cfg=cfg.logger, wandb_id=wandb_id)
    wandb_id = metrics.wandb_id
    peak = peak_flops(env.device, t.precision, cfg.logger.get("peak_tflops"))
    stop = StopSignal().install()
    nan_steps = ckpt_lib.fault_steps("nan_at")
    sigterm_steps = ckpt_lib.fault_steps("sigterm_at")
    stop_at = int(t.stop_at) if t.get("stop_at") is not None else None
    hf_model = engine.module.model
    status, last_saved = "running", None

    def save(at_step: int) -> Path:
        state = {"step": at_step, "tokens_seen": tokens_seen, "bad_steps": bad_steps, "elapsed_s": elapsed,
                 "wandb_id": wandb_id, "world_size": env.world_size, "zero_stage": zero_stage,
                 "micro_batch_size": int(t.micro_batch_size), "grad_accum": grad_accum, "seq_len": plan["seq_len"],
                 "total_steps": total_steps, "time": time.strftime("%Y-%m-%d %H:%M:%S")}
        return checkpointer.save(engine, at_step, state, {"data": loader.state_dict()})

    # 5. the loop --------------------------------------------------------------------------
    engine.train()
    try:
        while step < total_steps:
            started = time.perf_counter()
            lr = lr_at(step, base_lr=float(t.lr), warmup_steps=int(t.warmup_steps), total_steps=total_steps,
                       schedule=t.lr_schedule, min_lr_ratio=float(t.min_lr_ratio))
            lam = lambda_at(step, lambda_max=float(cfg.l2a.regularizer.lambda_max), warmup_steps=int(t.warmup_steps),
                            total_steps=total_steps, schedule=cfg.l2a.regularizer.schedule)
            for group in engine.optimizer.param_groups:
                group["lr"] = lr

            # the step's micro-batches; count target tokens of the global batch first (one all-reduce)
            batches = []
            counts = torch.zeros(4, dtype=torch.float64)  # target tokens, tokens, document-prefix keys, window keys
            for _ in range(grad_accum):
                batch = loader.next_batch()
                batch["labels"] = next_token_labels(batch["input_ids"], batch["position_ids"], batch.pop("padding"))
                counts[0] += (batch["labels"] != -100).sum()
                counts[1:] += flops.key_counts(batch["position_ids"])
                batches.append({k: v.to(env.device, non_blocking=True) for k, v in batch.items()})
            counts = dist_utils.all_reduce(counts.to(env.device)).cpu()
            # DeepSpeed divides by grad_accum and averages over ranks; undo both so that the
            # gradient is that of (sum of token losses) / (target tokens of the global batch)
            lm_scale = env.world_size * grad_accum / max(1.0, float(counts[0]))

            sums = torch.zeros(3 + 2 * len(layer_types), dtype=torch.float64, device=env.device)
            for micro, batch in enumerate(batches):
                hf_model.set_routing_step(step * grad_accum + micro)
                loss, lm_sum, reg, routed, prob = engine(batch["input_ids"], batch["position_ids"], batch["labels"],
                                                         lm_scale=lm_scale, reg_weight=lam)
                if step + 1 in nan_steps:  # tests: a non-finite loss
                    loss, lm_sum = loss * float("nan"), lm_sum * float("nan")
                engine.backward(loss)
                sums[0] += lm_sum.double()
                sums[1] += reg.double()
                sums[3:3 + len(layer_types)] += routed.double()
                sums[3 + len(layer_types):] += prob.double()
                if micro < grad_accum - 1:
                    engine.step()  # accumulation only
            if step + 1 in sigterm_steps and env.is_main:  # tests: a scheduler's SIGTERM
                os.kill(os.getpid(), signal.SIGTERM)
            sums[2] = float(stop.received)
            sums = dist_utils.all_reduce(sums).cpu()
            finite = math.isfinite(float(sums[0])) and math.isfinite(float(sums[1]))
            grad_norm = _plain_grad_norm(engine) if plain_optimizer else None
            if plain_optimizer and not (finite and math.isfinite(grad_norm)):
                _skip_plain_update(engine)  # DeepSpeed's ZeRO / bf16 optimizers skip non-finite steps themselves
            else:
                engine.step()  # the optimizer update
            if not plain_optimizer:
                grad_norm = engine.get_global_grad_norm()
                grad_norm = float(grad_norm) if grad_norm is not None else None
            skipped = not finite or not engine.was_step_applied() or (grad_norm is not None and not math.isfinite(grad_norm))
            step += 1
            if env.device.type == "cuda":
                torch.cuda.synchronize(env.device)  # honest step times for tokens/s and MFU
            step_time = time.perf_counter() - started
            elapsed += step_time
            tokens_seen += int(counts[1])

            # metrics
            n_micro = env.world_size * grad_accum
            lm_loss = float(sums[0]) / max(1.0, float(counts[0]))
            reg_value = float(sums[1]) / n_micro
            routed_per_layer = (sums[3:3 + len(layer_types)] / n_micro).tolist()
            routed_fraction = summarize_routing(routed_per_layer, layer_types)
            flop = flops.step_flops(counts[1:], routed_per_layer)
            if skipped:
                bad_steps += 1
                metrics.write(f"step {step}: non-finite loss or gradients, update skipped "
                              f"({bad_steps} of at most {t.max_bad_steps})")
            if step % int(t.log_every) == 0 or step == total_steps or skipped:
                metrics.log({
                    "step": step, "tokens": tokens_seen, "loss": lm_loss + lam * reg_value, "lm_loss": lm_loss,
                    "reg": reg_value, "lambda": lam, "lr": lr, "grad_norm": grad_norm,
                    "routed_fraction": routed_fraction, "skip_rate": 1.0 - routed_fraction,
                    "routed_per_layer": routed_per_layer,
                    "mean_prob_per_layer": (sums[3 + len(layer_types):] / n_micro).tolist(),
                    "tokens_per_s": float(counts[1]) / step_time,
                    "tflops_per_device": flop / step_time / env.world_size / 1e12,
                    "mfu": flop / step_time / (peak * env.world_size) if peak else None,
                    "peak_mem_gib": peak_memory_gib(env.device), "step_time_s": step_time, "elapsed_s": elapsed,
                    "skipped": skipped,
                })

            # faults, signals, checkpoints
            if skipped and bad_steps > int(t.max_bad_steps):
                path = save(step)
                status = "stopped: non-finite loss"
                raise UserError(f"stopping at step {step}: {bad_steps} steps had a non-finite loss or gradients "
                                f"(trainer.max_bad_steps={t.max_bad_steps}); saved {path}; lower trainer.lr or check "
                                "the data, then rerun to resume")
            if sums[2] > 0:
                signum = int(stop.received) or int(signal.SIGTERM)
                path = save(step)
                status = f"stopped by {signal.Signals(signum).name}"
                metrics.write(f"received {signal.Signals(signum).name}: saved {path} at step {step}; "
                              "rerun the same command to resume")
                raise SystemExit(128 + signum)
            if step < total_steps and int(t.save_every) > 0 and step % int(t.save_every) == 0:
                last_saved = save(step)
            if stop_at is not None and step >= stop_at and step < total_steps:
                last_saved = save(step)
                status = f"stopped at step {step} (trainer.stop_at)"
                metrics.write(f"trainer.stop_at={stop_at}: saved {last_saved}; rerun without it to continue")
                break

        # 6. the end: final checkpoint, Hugging Face export, curves, summary ---------------
        if status == "running":
            status = "done"
            last_saved = save(step)
            resumed_complete = resume_state is not None and int(resume_state["step"]) >= total_steps
            if t.export_hf and not (resumed_complete and (run_dir / "hf" / "config.json").is_file()):
                ckpt_lib.export_hf(engine, hf_model, run_dir / "hf", env, tokenizer_path=plan["tokenizer"])
    finally:
        if status == "running":
            status = "failed"
        stop.restore()
        metrics.close()
        summary = None
        if env.is_main:
            summary = write_run_summary(run_dir, total_steps, status, {"name": str(cfg.name), "run_dir": str(run_dir)})
            try:
                from ..curves import plot_runs

                plot_runs([run_dir], run_dir / "curves.png", title=str(cfg.name))
            except FileNotFoundError:
                pass
        _release(engine)
    if env.is_main:
        log.info("%s at step %d: final loss %s, skip rate %s; run directory %s", status, step,
                 _fmt(summary.get("final_loss")), _fmt(summary.get("final_skip_rate")), run_dir)
    return summary or {}


def _plain_grad_norm(engine) -> float:
    """Global gradient norm before clipping, for ZeRO-0 fp32 (DeepSpeed reports none there)."""
    norms = [p.grad.detach().float().norm() for p in engine.module.parameters() if p.grad is not None]
    return float(torch.stack(norms).norm()) if norms else 0.0


def _skip_plain_update(engine) -> None:
    """Let DeepSpeed take its step bookkeeping without changing the weights or the optimizer
    state (ZeRO-0 fp32: the client AdamW would otherwise apply NaN gradients)."""
    import copy

    optimizer = engine.optimizer
    saved_state = copy.deepcopy(optimizer.state_dict())
    saved_lr = [group["lr"] for group in optimizer.param_groups]
    for p in engine.module.parameters():
        if p.grad is not None:
            p.grad.zero_()
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    engine.step()
    optimizer.load_state_dict(saved_state)
    for group, lr in zip(optimizer.param_groups, saved_lr):
        group["lr"] = lr


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def _quiet_libraries(rank: int) -> None:
    """Keep the console for our progress bar: library chatter down to warnings, other ranks silent."""
    import warnings

    for name in ("DeepSpeed", "compilers", "matplotlib", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*reduce_scatter_tensor.*", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*_get_pg_default_device.*")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    if rank != 0:
        log.setLevel(logging.WARNING)


def _release(engine) -> None:
    """Free the engine between the jobs of a sweep (they share the process)."""
    destroy = getattr(engine, "destroy", None)
    if callable(destroy):
        try:
            destroy()
        except Exception:  # noqa: BLE001  (cleanup must not mask the real outcome)
            pass
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

