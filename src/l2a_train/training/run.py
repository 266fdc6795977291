"""What `l2a-train` does: continued pretraining of an L2A model with DeepSpeed.

    l2a-train experiment=quickstart                      # the quickstart's tiny run
    l2a-train experiment=qwen3_8b_128k model.path=... data.path=...
    torchrun --nproc_per_node=8 -m l2a_train.cli.train experiment=...
    l2a-train -m experiment=... l2a.regularizer.lambda_max=1e-8,1e-7 trainer.lr=2e-5,5e-5   # a sweep

`run(cfg)` reads top to bottom as:

    plan    <- check_config(cfg)                    # settings, model facts, data manifest (plan.py)
    memory plan printed; a dry run stops here
    process group, run directory
    resume  <- plan_resume(...)                     # own checkpoint, init_from, universal? (resume.py)
    built   <- build(...)                           # data loader, model, DeepSpeed engine (engine.py)
    state   <- restore(...)                         # step, tokens, data position, RNG
    while state.step < total steps:
        stats <- train_step(state.step)             # one optimizer step -> StepStats (step.py)
        state.advance(stats); log the step
        after_step(...)                             # save every N / signal / stop_at / bad steps (stopping.py)
    final checkpoint, Hugging Face export, summary.json, curves.png

Each start-up phase logs its seconds and the first step ends with one line "start-up: ... s to
the first step" (startup.py). Tests inject faults through L2A_FAULT (faults.py), which wraps the
step and the checkpointer's methods; nothing here asks whether a fault is on.
Other modules of this package: distributed.py (process group), loss.py (fused cross-entropy),
schedules.py, checkpoints.py (atomic save / exact resume / HF export), memory.py (the memory
plan), metrics.py (metrics.jsonl, wandb, progress bar, MFU), profiling.py (trainer.profile_step), sweep.py
(summaries);
`l2a_train.curves` draws curves.png.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from . import checkpoints as ckpt_lib
from . import distributed as dist_utils
from . import faults
from . import memory as memory_lib
from . import resume as resume_lib
from .engine import build
from .metrics import MetricsLogger, peak_flops, peak_memory_gib, summarize_routing
from .plan import check_config, experiment_applied, memory_plan
from .profiling import profiled
from .startup import StartupClock
from .step import TrainStep
from .stopping import StopSignal, after_step
from .sweep import write_run_summary

log = logging.getLogger("l2a_train")

__all__ = ["run", "check_config"]


def run(cfg: DictConfig) -> dict:
    """Train as configured; returns the run summary (also written to <run dir>/summary.json)."""
    env = dist_utils.world()
    clock = StartupClock(enabled=env.is_main)
    with clock.phase("config checks and plan"):
        plan = check_config(cfg, env.world_size)
        memory = memory_plan(cfg, plan, env.world_size)
    device_bytes = memory_lib.device_memory(cfg, env.device)
    if env.is_main:
        log.info("%s", memory.markdown(device_bytes))
    if cfg.trainer.dry_run:
        return {"status": "dry run", "predicted_peak_gib": memory.total / memory_lib.GIB,
                "memory_plan": {k: v / memory_lib.GIB for k, v in memory.terms.items()}}
    memory.check(device_bytes)

    with clock.phase("process group"):
        env, run_dir, checkpointer = start(cfg, env)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    with clock.phase("resume plan"):
        resume = resume_lib.plan_resume(cfg, plan, env, checkpointer, resolved)
    if resume.universal:
        with clock.phase("universal-checkpoint conversion"):
            resume_lib.convert_universal(resume.source, checkpointer, env)
    built = build(cfg, plan, env, resume.universal, clock)
    with clock.phase("checkpoint load"):
        state = restore(cfg, built, checkpointer, resume)
    announce(cfg, plan, env, run_dir, built)
    metrics = MetricsLogger(run_dir, enabled=env.is_main, total_steps=plan.total_steps, start_step=state.step,
                            run_name=str(cfg.name), config=resolved, logger_cfg=cfg.logger, wandb_id=state.wandb_id)
    state.wandb_id = metrics.wandb_id
    peak = peak_flops(env.device, cfg.trainer.precision, cfg.logger.peak_tflops)
    stop = StopSignal().install()
    train_step = TrainStep(cfg, plan, env, built, stop)
    faults.install(train_step, checkpointer, env)  # tests only (L2A_FAULT); nothing when unset

    def save(at: RunState) -> Path:
        return checkpointer.save(built.engine, at.step, at.checkpoint_state(env, plan, cfg.trainer),
                                 {"data": built.loader.state_dict()})

    built.engine.train()
    try:
        while state.step < plan.total_steps:
            with profiled(state.step + 1, cfg.trainer.profile_step, run_dir, env.is_main):
                stats = train_step(state.step)
            state.advance(stats)
            log_step(metrics, cfg.trainer, plan, env, built, state, stats, peak)
            clock.first_step(stats.step_time)
            if after_step(state, stats, cfg.trainer, plan.total_steps, stop, save, metrics):
                break
        if state.status == "running":
            state.status = "done"
            if cfg.trainer.save_final:
                state.last_saved = save(state)
            export(cfg, plan, env, run_dir, built, resume)
    finally:
        if state.status == "running":
            state.status = "failed"
        stop.restore()
        metrics.close()
        summary = close_run(cfg, env, run_dir, plan, state, built)
    if env.is_main:
        log.info("%s at step %d: final loss %s, skip rate %s; run directory %s", state.status, state.step,
                 _fmt(summary.get("final_loss")), _fmt(summary.get("final_skip_rate")), run_dir)
    return summary or {}


# ---------------------------------------------------------------------------------------------
# The named steps of `run`


@dataclass
class RunState:
    """What a checkpoint carries besides weights, optimizer, data position and RNG."""

    step: int = 0
    tokens_seen: int = 0
    bad_steps: int = 0  # a resumed run starts a new budget of trainer.max_bad_steps
    elapsed: float = 0.0  # seconds of training steps, all processes of the run
    wandb_id: str | None = None
    status: str = "running"
    last_saved: Path | None = None

    def advance(self, stats) -> None:
        self.step += 1
        self.elapsed += stats.step_time
        self.tokens_seen += stats.tokens
        if stats.skipped:
            self.bad_steps += 1

    def checkpoint_state(self, env, plan, t) -> dict:
        return {"step": self.step, "tokens_seen": self.tokens_seen, "bad_steps": self.bad_steps,
                "elapsed_s": self.elapsed, "wandb_id": self.wandb_id, "world_size": env.world_size,
                "zero_stage": plan.zero_stage, "micro_batch_size": int(t.micro_batch_size),
                "grad_accum": plan.grad_accum, "seq_len": plan.seq_len, "total_steps": plan.total_steps,
                "time": time.strftime("%Y-%m-%d %H:%M:%S")}


def start(cfg, env):
    """Quiet the libraries, start the process group, create the run directory."""
    _quiet_libraries(env.rank)
    env = dist_utils.init_distributed()
    if env.device.type == "cpu":
        torch.set_flush_denormal(True)  # denormal floats in early training slow CPU steps down up to 10x
    run_dir = run_directory(cfg)
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    dist_utils.barrier()
    return env, run_dir, ckpt_lib.Checkpointer(run_dir, cfg.trainer.keep_last, env)


def restore(cfg, built, checkpointer, resume) -> RunState:
    """Continue a checkpoint of this run (step, tokens, data position, RNG), or start from another
    run's weights (trainer.init_from), or from step 0."""
    state = RunState()
    if resume.resume_path is not None:
        saved, rank_state = checkpointer.load(built.engine, resume.resume_path, resume.universal)
        state.step, state.tokens_seen = int(saved["step"]), int(saved["tokens_seen"])
        state.elapsed, state.wandb_id = float(saved.get("elapsed_s", 0.0)), saved.get("wandb_id")
        built.loader.load_state_dict(rank_state["data"])
        log.info("resumed from %s at step %d (%d tokens seen)", resume.resume_path, state.step, state.tokens_seen)
    elif resume.init_path is not None:
        t = cfg.trainer
        checkpointer.load_weights(built.engine, resume.init_path, with_optimizer=bool(t.init_optimizer),
                                  universal=resume.universal)
        log.info("initialised from %s (%s); step, schedule and data start fresh", resume.init_path,
                 "weights and optimizer" if t.init_optimizer else "weights")
    return state


def announce(cfg, plan, env, run_dir: Path, built) -> None:
    """config.yaml and deepspeed_config.json into the run directory, and one line about the run."""
    if not env.is_main:
        return
    t = cfg.trainer
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    (run_dir / "deepspeed_config.json").write_text(json.dumps(built.ds_config, indent=2) + "\n")
    log.info("run %s (%s): %d processes, %d rows x %d tokens per step (micro %d x accum %d x world %d), "
             "%.1fM trainable parameters, ZeRO-%d, %s", run_dir, experiment_applied(), env.world_size,
             plan.global_rows, plan.seq_len, t.micro_batch_size, plan.grad_accum, env.world_size,
             built.trainable_params / 1e6, plan.zero_stage, t.precision)


def log_step(metrics, t, plan, env, built, state: RunState, stats, peak) -> None:
    """A line for a skipped update; the step's record in metrics.jsonl every trainer.log_every steps."""
    if stats.skipped:
        metrics.write(f"step {state.step}: non-finite loss or gradients, update skipped "
                      f"({state.bad_steps} of at most {t.max_bad_steps})")
    if not (state.step % int(t.log_every) == 0 or state.step == plan.total_steps or stats.skipped):
        return
    routed_fraction = summarize_routing(stats.routed_per_layer, built.layer_types)
    metrics.log({
        "step": state.step, "tokens": state.tokens_seen, "loss": stats.lm_loss + stats.lam * stats.reg,
        "lm_loss": stats.lm_loss, "reg": stats.reg, "lambda": stats.lam, "lr": stats.lr, "grad_norm": stats.grad_norm,
        "routed_fraction": routed_fraction, "skip_rate": 1.0 - routed_fraction,
        "routed_per_layer": stats.routed_per_layer, "mean_prob_per_layer": stats.mean_prob_per_layer,
        "tokens_per_s": float(stats.tokens) / stats.step_time,
        "tflops_per_device": stats.flop / stats.step_time / env.world_size / 1e12,
        "mfu": stats.flop / stats.step_time / (peak * env.world_size) if peak else None,
        "peak_mem_gib": peak_memory_gib(env.device), "step_time_s": stats.step_time, "elapsed_s": state.elapsed,
        "skipped": stats.skipped,
    })


def export(cfg, plan, env, run_dir: Path, built, resume) -> None:
    """The Hugging Face export of the final weights (kept when a finished run is started again)."""
    resumed_complete = resume.resume_state is not None and int(resume.resume_state["step"]) >= plan.total_steps
    if cfg.trainer.export_hf and not (resumed_complete and (run_dir / "hf" / "config.json").is_file()):
        ckpt_lib.export_hf(built.engine, built.hf_model, run_dir / "hf", env, tokenizer_path=plan.tokenizer)


def close_run(cfg, env, run_dir: Path, plan, state: RunState, built) -> dict | None:
    """summary.json and curves.png (rank 0), then free the engine; returns the summary."""
    summary = None
    if env.is_main:
        summary = write_run_summary(run_dir, plan.total_steps, state.status, {"name": str(cfg.name), "run_dir": str(run_dir)})
        try:
            from ..curves import plot_runs

            plot_runs([run_dir], run_dir / "curves.png", title=str(cfg.name))
        except FileNotFoundError:
            pass
    _release(built.engine)
    return summary


def run_directory(cfg) -> Path:
    """Hydra's output directory (a sweep job's own), or cfg.run_dir when called without Hydra."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except (ImportError, ValueError):
        return Path(cfg.run_dir)


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

