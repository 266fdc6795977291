"""One optimizer step of the trainer, returning what happened as a `StepStats`.

    step = TrainStep(cfg, plan, env, built, stop)
    stats = step(k)        # k: optimizer steps done before this one

    lr, lambda  <- pure functions of the step (schedules.py)
    the step's micro-batches; their target tokens, all ranks (all-reduce 1)
    for each micro-batch:  loss = CE(hidden @ lm_head) * lm_scale + lambda R ; backward
    sums of loss, R, routed fraction and mean p per layer, and the stop flag (all-reduce 2)
    the update (skipped when anything is non-finite)

The LM loss is normalised by the number of target tokens of the whole global batch (all ranks
and micro-steps), so the update does not depend on how the batch is split across processes.
Each all-reduce is one float64 buffer of named parts (`reduce_named`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from . import distributed as dist_utils
from .engine import plain_grad_norm, skip_plain_update
from .loss import next_token_labels
from .schedules import lambda_at, lr_at


@dataclass
class StepStats:
    lr: float
    lam: float  # the regularizer's weight
    lm_loss: float  # per target token of the global batch
    reg: float  # R, averaged over micro-batches and ranks
    grad_norm: float | None
    routed_per_layer: list[float]
    mean_prob_per_layer: list[float]
    tokens: int  # tokens of the global batch
    flop: float
    step_time: float  # seconds
    skipped: bool  # non-finite loss or gradients: the update was not applied
    stop_requested: bool  # some rank received SIGTERM / SIGUSR1


def reduce_named(parts: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    """Sum every part over the ranks in one all-reduce; the parts come back by name, on the CPU."""
    flat = torch.cat([p.reshape(-1).to(device=device, dtype=torch.float64) for p in parts.values()])
    flat = dist_utils.all_reduce(flat).cpu()
    return dict(zip(parts, flat.split([p.numel() for p in parts.values()])))


class TrainStep:
    def __init__(self, cfg, plan, env, built, stop):
        self.t, self.reg_cfg, self.plan, self.env, self.stop = cfg.trainer, cfg.l2a.regularizer, plan, env, stop
        self.engine, self.loader, self.flops = built.engine, built.loader, built.flops
        self.hf_model, self.plain_optimizer = built.hf_model, built.plain_optimizer
        self.num_layers = len(built.layer_types)

    def __call__(self, step: int) -> StepStats:
        t, plan, env = self.t, self.plan, self.env
        started = time.perf_counter()
        lr = lr_at(step, base_lr=float(t.lr), warmup_steps=int(t.warmup_steps), total_steps=plan.total_steps,
                   schedule=t.lr_schedule, min_lr_ratio=float(t.min_lr_ratio))
        lam = lambda_at(step, lambda_max=float(self.reg_cfg.lambda_max), warmup_steps=int(t.warmup_steps),
                        total_steps=plan.total_steps, schedule=self.reg_cfg.schedule)
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        batches, counts = self.next_batches()
        # DeepSpeed divides by grad_accum and averages over ranks; undo both so that the
        # gradient is that of (sum of token losses) / (target tokens of the global batch)
        lm_scale = env.world_size * plan.grad_accum / max(1.0, float(counts["target_tokens"]))
        sums = self.accumulate(step, batches, lm_scale, lam)
        sums["stop"] = torch.tensor([float(self.stop.received)], dtype=torch.float64, device=env.device)
        sums = reduce_named(sums, env.device)
        finite = math.isfinite(float(sums["lm_sum"])) and math.isfinite(float(sums["reg_sum"]))
        grad_norm, applied = self.update(finite)
        if env.device.type == "cuda":
            torch.cuda.synchronize(env.device)  # honest step times for tokens/s and MFU
        step_time = time.perf_counter() - started
        n_micro = env.world_size * plan.grad_accum
        routed_per_layer = (sums["routed"] / n_micro).tolist()
        return StepStats(
            lr=lr, lam=lam, lm_loss=float(sums["lm_sum"]) / max(1.0, float(counts["target_tokens"])),
            reg=float(sums["reg_sum"]) / n_micro, grad_norm=grad_norm, routed_per_layer=routed_per_layer,
            mean_prob_per_layer=(sums["mean_prob"] / n_micro).tolist(), tokens=int(counts["key_counts"][0]),
            flop=self.flops.step_flops(counts["key_counts"], routed_per_layer), step_time=step_time,
            skipped=not finite or not applied or (grad_norm is not None and not math.isfinite(grad_norm)),
            stop_requested=float(sums["stop"]) > 0)

    def next_batches(self):
        """The step's micro-batches on the device, and their counts summed over the ranks."""
        batches = []
        target_tokens = torch.zeros(1, dtype=torch.float64)
        key_counts = torch.zeros(3, dtype=torch.float64)  # tokens, document-prefix keys, window keys
        for _ in range(self.plan.grad_accum):
            batch = self.loader.next_batch()
            batch["labels"] = next_token_labels(batch["input_ids"], batch["position_ids"], batch.pop("padding"))
            target_tokens += (batch["labels"] != -100).sum()
            key_counts += self.flops.key_counts(batch["position_ids"])
            batches.append({k: v.to(self.env.device, non_blocking=True) for k, v in batch.items()})
        return batches, reduce_named({"target_tokens": target_tokens, "key_counts": key_counts}, self.env.device)

    def micro_batch(self, step: int, micro: int, batch: dict, lm_scale: float, lam: float):
        """Forward of one micro-batch: (loss, LM loss sum, R, routed fraction, mean p per layer)."""
        self.hf_model.set_routing_step(step * self.plan.grad_accum + micro)  # the same draw on every rank
        return self.engine(batch["input_ids"], batch["position_ids"], batch["labels"], lm_scale=lm_scale, reg_weight=lam)

    def accumulate(self, step: int, batches: list[dict], lm_scale: float, lam: float) -> dict:
        """Forward and backward of every micro-batch; this rank's sums, by name."""
        device = self.env.device
        sums = {"lm_sum": torch.zeros(1, dtype=torch.float64, device=device),
                "reg_sum": torch.zeros(1, dtype=torch.float64, device=device),
                "routed": torch.zeros(self.num_layers, dtype=torch.float64, device=device),
                "mean_prob": torch.zeros(self.num_layers, dtype=torch.float64, device=device)}
        for micro, batch in enumerate(batches):
            loss, lm_sum, reg, routed, prob = self.micro_batch(step, micro, batch, lm_scale, lam)
            self.engine.backward(loss)
            sums["lm_sum"] += lm_sum.double()
            sums["reg_sum"] += reg.double()
            sums["routed"] += routed.double()
            sums["mean_prob"] += prob.double()
            if micro < len(batches) - 1:
                self.engine.step()  # accumulation only
        return sums

    def update(self, finite: bool) -> tuple[float | None, bool]:
        """The optimizer update; (gradient norm, whether it was applied)."""
        engine = self.engine
        if self.plain_optimizer:
            grad_norm = plain_grad_norm(engine)
            if finite and math.isfinite(grad_norm):
                engine.step()
            else:
                skip_plain_update(engine)  # DeepSpeed's ZeRO / bf16 optimizers skip non-finite steps themselves
            return grad_norm, engine.was_step_applied()
        engine.step()
        grad_norm = engine.get_global_grad_norm()
        return (float(grad_norm) if grad_norm is not None else None), engine.was_step_applied()
