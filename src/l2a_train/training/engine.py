"""The model, its loss and the DeepSpeed engine of a training run.

    built = build(cfg, plan, env, universal, clock)   # data loader, model, optimizer, engine
    built.engine(input_ids, position_ids, labels, lm_scale=..., reg_weight=...)   # CausalLMWithLoss

`CausalLMWithLoss` is also what scripts/bench_train.py times (one module, no side effects on import).
ZeRO-0 in fp32 is the one layout where DeepSpeed steps our AdamW directly (`built.plain_optimizer`):
it reports no gradient norm and does not skip non-finite updates, so `plain_grad_norm` and
`skip_plain_update` do that here.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from omegaconf import OmegaConf

from .loss import linear_cross_entropy
from .memory import optimizer_offloaded


class CausalLMWithLoss(torch.nn.Module):
    """forward -> (loss to back-propagate, LM loss sum, R, routed fraction, mean p per layer).

    The LM loss is a sum over target tokens times `lm_scale` (1 / tokens of the global batch,
    times the factor DeepSpeed divides by); logits are never materialised (loss.py)."""

    def __init__(self, model, loss_backend: str = "auto", zero_stage: int = 0):
        super().__init__()
        self.model = model
        self.loss_backend = loss_backend
        if zero_stage == 3:  # lm_head.weight is used outside lm_head.forward: ZeRO-3 must gather it here
            import deepspeed

            deepspeed.zero.register_external_parameter(self, model.lm_head.weight)

    def forward(self, input_ids, position_ids, labels, lm_scale: float, reg_weight: float):
        out = self.model.model(input_ids=input_ids, position_ids=position_ids)
        lm_sum = linear_cross_entropy(out.last_hidden_state, self.model.lm_head.weight, labels,
                                      reduction="sum", backend=self.loss_backend)
        loss = lm_sum * lm_scale + reg_weight * out.router_reg
        return loss, lm_sum.detach(), out.router_reg.detach().float(), out.routed_fraction, out.mean_prob


@dataclass
class Built:
    """What a run trains with, once built."""

    engine: object  # DeepSpeed's engine around CausalLMWithLoss
    loader: object  # PackedLoader
    flops: object  # FlopsCounter
    layer_types: list[str]
    trainable_params: int
    ds_config: dict
    plain_optimizer: bool  # ZeRO-0 fp32: DeepSpeed steps the client AdamW as is

    @property
    def hf_model(self):
        return self.engine.module.model


def build(cfg, plan, env, universal: bool, clock) -> Built:
    """Seed, open the data, build (or load) the model, wrap it for DeepSpeed; one start-up phase each."""
    import deepspeed  # imported with the process group already

    from ..data import PackedDataset, PackedLoader
    from .checkpoints import seed_everything
    from .metrics import FlopsCounter

    t = cfg.trainer
    seed_everything(int(t.seed))
    with clock.phase("data loader"):
        dataset = PackedDataset(plan.data_path, seq_len=cfg.data.get("seq_len"))
        loader = PackedLoader(dataset, micro_batch_size=int(t.micro_batch_size), rank=env.rank,
                              world_size=env.world_size, seed=int(t.seed), shuffle=bool(cfg.data.shuffle))
    with clock.phase("model build or load"):
        model, trainable = build_model(cfg, env.device)
    flops = FlopsCounter(model)
    layer_types = list(getattr(model.config, "l2a_layer_types", None) or ["global"] * model.config.num_hidden_layers)
    module = CausalLMWithLoss(model, t.loss_backend, plan.zero_stage)
    optimizer = make_optimizer(module, t, cfg.deepspeed.zero_optimization, env.device)
    ds_config = deepspeed_config(cfg, plan.grad_accum, universal)
    with clock.phase("DeepSpeed engine set-up"):  # the model is on its device already (build_model)
        engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=ds_config)
    plain = plan.zero_stage == 0 and t.precision != "bf16"
    return Built(engine, loader, flops, layer_types, trainable, ds_config, plain)


def build_model(cfg, device):
    """The model of the run, prepared for training, with its weights created or loaded on `device`
    (random weights initialise in seconds on a GPU, in minutes on the CPU); (model, trainable
    parameter count)."""
    from ..model import apply_trainable
    from ..model import build_model as build_l2a_model
    from ..model.checkpointing import enable_checkpointing

    model = build_l2a_model(cfg.model, cfg.l2a, device=device)
    trainable = apply_trainable(model, cfg.l2a.trainable)
    model.config.use_cache = False
    if cfg.trainer.grad_checkpointing:
        enable_checkpointing(model, keep_attention=cfg.trainer.keep_attention_outputs)
    return model, trainable


def make_optimizer(module, t, zero, device):
    """AdamW over the trainable parameters: torch's (fused on CUDA), or DeepSpeed's CPU Adam in
    AdamW mode when the optimizer is offloaded (DeepSpeed refuses a torch optimizer there: it
    would step the CPU copies of the weights one tensor at a time). Same groups and settings."""
    groups = optimizer_groups(module, float(t.weight_decay))
    settings = dict(lr=float(t.lr), betas=tuple(t.betas), eps=float(t.eps))
    if optimizer_offloaded(zero):
        from deepspeed.ops.adam import DeepSpeedCPUAdam  # builds its C++ op on first use

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **settings)
    return torch.optim.AdamW(groups, fused=device.type == "cuda", **settings)


def optimizer_groups(module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on matrices, none on vectors (norms, biases) and the router."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "router" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


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


def plain_grad_norm(engine) -> float:
    """Global gradient norm before clipping, for ZeRO-0 fp32 (DeepSpeed reports none there)."""
    norms = [p.grad.detach().float().norm() for p in engine.module.parameters() if p.grad is not None]
    return float(torch.stack(norms).norm()) if norms else 0.0


def skip_plain_update(engine) -> None:
    """Let DeepSpeed take its step bookkeeping without changing the weights or the optimizer
    state (ZeRO-0 fp32: the client AdamW would otherwise apply NaN gradients)."""
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
