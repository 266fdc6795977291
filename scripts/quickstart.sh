#!/usr/bin/env bash
# From a fresh clone to a trained tiny L2A model on CPU, in one command (`make quickstart`):
# built-in corpus + local tokenizer -> tiny Qwen3-shaped model (random weights) converted to L2A
# -> DeepSpeed ZeRO-2 training -> runs/quickstart/{metrics.jsonl, curves.png, checkpoints/}.
set -euo pipefail
cd "$(dirname "$0")/.."
make -s install
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
bin=.venv/bin

echo "== 1/3 prepare the built-in corpus (stdlib code repositories + passkey documents)"
$bin/l2a-prep prep=quickstart

echo "== 2/3 convert a tiny Qwen3-shaped model to L2A"
$bin/l2a-convert model=tiny_qwen3 l2a.window=128 tokenizer=data/quickstart/tokenizer \
  output=checkpoints/quickstart-l2a overwrite=true

echo "== 3/3 train with DeepSpeed ZeRO-2 on CPU"
rm -rf runs/quickstart  # the quickstart always starts from scratch; real runs resume (trainer.resume=auto)
start=$(date +%s)
$bin/l2a-train experiment=quickstart "$@"
echo "training took $(( $(date +%s) - start )) s; results in runs/quickstart: metrics.jsonl, curves.png, checkpoints/"
