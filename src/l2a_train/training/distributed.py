"""Process-group setup: torchrun's environment, or a single process with defaults.

    dist_env = world()                 # rank / world size from the environment, nothing started
    dist_env = init_distributed()      # the same, plus the process group (gloo on CPU, nccl on CUDA)

torchrun (and the deepspeed launcher, and SLURM through scripts/launch.sh) sets RANK,
WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT. A plain
`python -m l2a_train.cli.train` gets rank 0 of 1 and a free local port.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def world() -> DistEnv:
    """Rank and world size from the launcher's environment (single-process defaults)."""
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    if torch.cuda.is_available():
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    return DistEnv(rank, world_size, local_rank, local_world, device, backend)


def init_distributed() -> DistEnv:
    """Start (once per process) the default process group that DeepSpeed uses."""
    env = world()
    os.environ.setdefault("RANK", str(env.rank))
    os.environ.setdefault("WORLD_SIZE", str(env.world_size))
    os.environ.setdefault("LOCAL_RANK", str(env.local_rank))
    os.environ.setdefault("LOCAL_WORLD_SIZE", str(env.local_world_size))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        if env.world_size > 1:
            raise RuntimeError("WORLD_SIZE > 1 but MASTER_PORT is not set: launch with torchrun")
        os.environ["MASTER_PORT"] = str(_free_port())
    if env.device.type == "cuda":
        torch.cuda.set_device(env.device)
    elif env.local_world_size > 1 and "OMP_NUM_THREADS" not in os.environ:
        # CPU processes on one machine fight over cores; torchrun sets 1 thread, a bare launch may not
        threads = max(1, (os.cpu_count() or 1) // env.local_world_size)
        torch.set_num_threads(threads)
        if env.is_main:
            log.info("%d CPU processes per node: %d threads each (set OMP_NUM_THREADS to choose)",
                     env.local_world_size, threads)

    if env.device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # say so, instead of DeepSpeed warning that it guessed
    import deepspeed

    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=env.backend, auto_mpi_discovery=False, verbose=False)
    return env


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (a no-op in a single process); op: sum | max."""
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        red = {"sum": torch.distributed.ReduceOp.SUM, "max": torch.distributed.ReduceOp.MAX}[op]
        torch.distributed.all_reduce(tensor, op=red)
    return tensor


def barrier() -> None:
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()


def broadcast_object(obj, src: int = 0):
    """rank `src`'s Python object on every rank."""
    if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]
