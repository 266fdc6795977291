"""Launch plans: how the three Triton kernels are launched for one head dim.

A `LaunchPlan` is frozen and passed to the kernels explicitly (`plan=` of the public ops);
nothing in the package changes it at run time. `default_plan(head_dim, interpreted)` gives the
plan the ops use when none is passed: on a GPU the winners of `python -m l2a_kernels.bench
--tune` on an H200 (sm_90; measurements in docs/BENCHMARKS.md), under the Triton interpreter
small blocks so that the CPU tests cross many block edges. `bench --tune` returns a plan.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["HEAD_DIMS", "KernelConfig", "LaunchPlan", "default_plan"]

HEAD_DIMS = (16, 32, 64, 128)
_WARPS = (1, 2, 4, 8, 16)


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and launch options of one kernel. block_m counts rows, i.e. (token, query
    head) pairs; block_n counts keys."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int

    def __post_init__(self):
        for name in ("block_m", "block_n"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 16 and value & (value - 1) == 0):
                raise ValueError(f"KernelConfig.{name} must be a power of two >= 16, got {value!r}")
        if self.num_warps not in _WARPS:
            raise ValueError(f"KernelConfig.num_warps must be one of {_WARPS}, got {self.num_warps!r}")
        if not (isinstance(self.num_stages, int) and self.num_stages >= 1):
            raise ValueError(f"KernelConfig.num_stages must be an int >= 1, got {self.num_stages!r}")


@dataclass(frozen=True)
class LaunchPlan:
    """Launch configs and variant switches of the forward, dQ and dK/dV kernels.

    fwd, dq, dkdv: the kernels' `KernelConfig`s. The backward is always the dQ kernel (which
    also computes delta = rowsum(dO * O)) followed by the dK/dV kernel, which reads the routed
    query rows from copies in its own row order ([H, N * G, D]: one contiguous block per tile).

    TMA switches (requests: honoured when compiled for Hopper or newer and the tensors' layout
    allows it, pointer loads otherwise, which is also what the interpreter runs):
        fwd_kv_tma, dq_kv_tma: the forward / dQ kernel loads K/V tiles with TMA block copies.
        dkdv_tma: the dK/dV kernel loads its row tiles (q, dO, and lse with delta packed as
            [rows, 4]) with TMA block copies in its unmasked span.
    dkdv_edge_half: the dK/dV kernel runs its masked edge spans in half-height row tiles
        (fewer registers).
    dkdv_dp_first: the dK/dV kernel's loop issues dP = dO V^T right after S, before the
        exponentials of P, so that the tensor cores run it while they are computed.
    """

    fwd: KernelConfig
    dq: KernelConfig
    dkdv: KernelConfig
    fwd_kv_tma: bool = True
    dq_kv_tma: bool = True
    dkdv_tma: bool = True
    dkdv_edge_half: bool = True
    dkdv_dp_first: bool = True

    def __post_init__(self):
        for name in ("fwd", "dq", "dkdv"):
            if not isinstance(getattr(self, name), KernelConfig):
                raise TypeError(f"LaunchPlan.{name} must be a KernelConfig, got {type(getattr(self, name)).__name__}")
        for name in ("fwd_kv_tma", "dq_kv_tma", "dkdv_tma", "dkdv_edge_half", "dkdv_dp_first"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"LaunchPlan.{name} must be a bool, got {getattr(self, name)!r}")

    @property
    def dkdv_edge_m(self) -> int:
        """Row-tile height of the dK/dV kernel's masked edge spans."""
        return self.dkdv.block_m // 2 if self.dkdv_edge_half and self.dkdv.block_m >= 16 else self.dkdv.block_m


# Chosen on an H200 by `bench --tune` (head dims 16 and 32 use the plan of 64).
_GPU_PLANS = {
    64: LaunchPlan(fwd=KernelConfig(128, 64, 8, 3), dq=KernelConfig(128, 64, 4, 3), dkdv=KernelConfig(64, 64, 4, 3)),
    128: LaunchPlan(fwd=KernelConfig(128, 128, 8, 3), dq=KernelConfig(128, 64, 8, 3), dkdv=KernelConfig(64, 64, 4, 2)),
}
_SMALL = KernelConfig(16, 16, 1, 1)
_INTERPRETER_PLAN = LaunchPlan(fwd=_SMALL, dq=_SMALL, dkdv=_SMALL, fwd_kv_tma=False, dq_kv_tma=False, dkdv_tma=False)


def default_plan(head_dim: int, interpreted: bool) -> LaunchPlan:
    """The plan the ops use for `head_dim` when none is passed: the H200 winners when the
    kernels are compiled, small blocks when they run in the Triton interpreter."""
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"head_dim must be one of {HEAD_DIMS}, got {head_dim!r}")
    if interpreted:
        return _INTERPRETER_PLAN
    return _GPU_PLANS[64 if head_dim <= 64 else 128]
