"""The model and its loss as one module for DeepSpeed (used by the trainer and scripts/bench_train.py)."""

from __future__ import annotations

import torch

from .loss import linear_cross_entropy


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
