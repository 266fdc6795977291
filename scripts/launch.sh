#!/usr/bin/env bash
# Launch l2a-train on one or several nodes. Every argument goes to l2a-train (Hydra overrides).
#
#   One node, all its GPUs:
#     scripts/launch.sh experiment=qwen3_8b_128k model.path=... data.path=...
#   SLURM, one task per node (node count, rank and master come from SLURM):
#     srun --nodes=4 --ntasks-per-node=1 --gpus-per-node=8 scripts/launch.sh experiment=...
#     (add `#SBATCH --signal=USR1@300`: the trainer saves a checkpoint and exits; rerun to resume)
#   By hand, the same command on every node:
#     NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 scripts/launch.sh experiment=...     # on node0
#     NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 scripts/launch.sh experiment=...     # on node1
#   The deepspeed launcher with a hostfile (lines "node0 slots=8"), started once, from node0:
#     LAUNCHER=deepspeed HOSTFILE=hostfile scripts/launch.sh experiment=...
#   SLURM without torchrun, one task per GPU: each training process gets SLURM's signals itself,
#   so `--signal=USR1@300` (save and exit before the time limit) reaches every rank:
#     srun --nodes=4 --ntasks-per-node=8 --gpus-per-node=8 --signal=USR1@300 \
#       env LAUNCHER=srun scripts/launch.sh experiment=...
#   (under torchrun, a SIGTERM to the launcher is forwarded to the ranks, which save and exit;
#   torchrun kills them 30 s later, so prefer LAUNCHER=srun when checkpoints take longer)
#
# Settings (environment): NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT (29500), GPUS_PER_NODE
# (all visible GPUs), LAUNCHER (torchrun | deepspeed | srun), HOSTFILE, RDZV_ID, DRY_RUN=1 (print only).
# Every rank writes into the same run directory, so it must be on a filesystem all nodes share.
# torchrun passes ranks through the environment; the deepspeed launcher is run with
# --no_local_rank because its --local_rank argument is not a Hydra override.
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=${BIN:-.venv/bin}
[ -x "$BIN/torchrun" ] || BIN=$(dirname "$(command -v torchrun || echo /usr/bin/torchrun)")
LAUNCHER=${LAUNCHER:-torchrun}

if [ -n "${SLURM_JOB_ID:-}" ] && [ -z "${NNODES:-}" ]; then
  NNODES=${SLURM_NNODES:-1}
  NODE_RANK=${SLURM_NODEID:-0}
  MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
  RDZV_ID=${RDZV_ID:-$SLURM_JOB_ID}
fi
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
RDZV_ID=${RDZV_ID:-l2a-train}
if [ -z "${GPUS_PER_NODE:-}" ]; then
  GPUS_PER_NODE=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  [ "$GPUS_PER_NODE" -gt 0 ] || GPUS_PER_NODE=1
fi

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export WANDB_MODE=${WANDB_MODE:-offline}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}   # DeepSpeed's JIT ops on H100/H200

case "$LAUNCHER" in
  torchrun)
    if [ "$NNODES" -eq 1 ]; then
      cmd=("$BIN/torchrun" --standalone --nproc_per_node="$GPUS_PER_NODE")
    else
      cmd=("$BIN/torchrun" --nnodes="$NNODES" --node_rank="$NODE_RANK" --nproc_per_node="$GPUS_PER_NODE"
           --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv_id="$RDZV_ID")
    fi
    cmd+=(-m l2a_train.cli.train "$@")
    ;;
  deepspeed)
    cmd=("$BIN/deepspeed" --no_local_rank --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
    if [ -n "${HOSTFILE:-}" ]; then
      cmd+=(--hostfile "$HOSTFILE")
    else
      cmd+=(--num_gpus "$GPUS_PER_NODE")
    fi
    cmd+=(--module l2a_train.cli.train "$@")
    ;;
  srun)  # this script runs once per rank, started by srun
    export RANK=${SLURM_PROCID:?LAUNCHER=srun needs srun} WORLD_SIZE=${SLURM_NTASKS:?}
    export LOCAL_RANK=${SLURM_LOCALID:?} LOCAL_WORLD_SIZE=$(( SLURM_NTASKS / NNODES ))
    export MASTER_ADDR MASTER_PORT
    cmd=("$BIN/python" -m l2a_train.cli.train "$@")
    ;;
  *)
    echo "error: LAUNCHER=$LAUNCHER: use torchrun, deepspeed or srun" >&2
    exit 2
    ;;
esac

if [ -n "${DRY_RUN:-}" ]; then
  printf '%q ' "${cmd[@]}"
  echo
  exit 0
fi
exec "${cmd[@]}"
