"""scripts/launch.sh builds the right launcher command (DRY_RUN=1 prints it)."""

import os
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e  # runs the commands as a user does; `pytest -m "not e2e"` runs the unit tests

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "launch.sh"


def launch(*args, **env):
    full = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    full.update(DRY_RUN="1", GPUS_PER_NODE="8", **env)
    proc = subprocess.run(["bash", str(SCRIPT), *args], env=full, capture_output=True, text=True, timeout=30)
    return proc.returncode, proc.stdout.strip(), proc.stderr.strip()


def test_one_node_torchrun():
    rc, out, _ = launch("experiment=quickstart")
    assert rc == 0 and "torchrun --standalone --nproc_per_node=8 -m l2a_train.cli.train experiment=quickstart" in out


def test_multi_node_rendezvous():
    rc, out, _ = launch("x=1", NNODES="2", NODE_RANK="1", MASTER_ADDR="node0", MASTER_PORT="1234")
    assert rc == 0
    for part in ("--nnodes=2", "--node_rank=1", "--rdzv_backend=c10d", "--rdzv_endpoint=node0:1234", "-m l2a_train.cli.train x=1"):
        assert part in out


def test_slurm_environment():
    rc, out, _ = launch("x=1", SLURM_JOB_ID="42", SLURM_NNODES="4", SLURM_NODEID="3", MASTER_ADDR="n0")
    assert rc == 0 and "--nnodes=4" in out and "--node_rank=3" in out and "--rdzv_id=42" in out


def test_deepspeed_launcher_without_local_rank_argument():
    rc, out, _ = launch("x=1", LAUNCHER="deepspeed", HOSTFILE="hosts")
    assert rc == 0 and "--no_local_rank" in out and "--hostfile hosts" in out and "--module l2a_train.cli.train x=1" in out


def test_srun_per_rank():
    rc, out, _ = launch("x=1", LAUNCHER="srun", SLURM_JOB_ID="1", SLURM_NNODES="2", SLURM_NODEID="0",
                        SLURM_PROCID="3", SLURM_NTASKS="16", SLURM_LOCALID="3", MASTER_ADDR="n0")
    assert rc == 0 and out.endswith("-m l2a_train.cli.train x=1")


@pytest.mark.parametrize("launcher", ["mpirun"])
def test_unknown_launcher(launcher):
    rc, _, err = launch(LAUNCHER=launcher)
    assert rc == 2 and err.startswith("error:")
