"""The `device` setting of the commands that build or run a model (l2a-convert, l2a-eval,
l2a-prune, l2a-generate) as a torch device."""

from __future__ import annotations

import torch

from l2a_common import UserError


def resolve_device(setting: str | None) -> torch.device:
    """auto (or unset): the GPU when there is one, else the CPU; otherwise cpu or cuda[:N]."""
    if setting in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(setting)
    except RuntimeError:
        raise UserError(f"device={setting}: not a device; use auto, cpu or cuda[:N]") from None
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"device={setting}: the commands run on cpu or cuda[:N] (or auto)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device={setting}: this machine has no CUDA GPU; use device=cpu or device=auto")
    return device
