#!/usr/bin/env bash
# The real job, end to end, through the real commands, with the learned router:
#   l2a-prep -> l2a-convert -> l2a-train (stopped by SIGTERM halfway, then resumed) -> Hugging
#   Face export -> l2a-eval -> l2a-prune -> l2a-generate from the pruned checkpoint.
# Prints one Markdown table, a row per stage (status `ok` or the error line, seconds, key
# figures), also written to <dir>/acceptance.md; each stage's log is <dir>/logs/<stage>.log.
# Exits non-zero when a stage fails (later stages are then not run).
#
#   bash scripts/acceptance.sh            # one GPU: Qwen2.5-1.5B shape (random weights), 32K rows, 60 steps
#   bash scripts/acceptance.sh --tiny     # CPU: a tiny Qwen3-shaped model, 1K rows, 40 steps, same stages (the test suite runs it)
#   bash scripts/acceptance.sh --dir D    # work directory (default: a new temporary one)
set -uo pipefail
cd "$(dirname "$0")/.."
tiny=0; dir=""
while [ $# -gt 0 ]; do
  case "$1" in
    --tiny) tiny=1 ;;
    --dir) dir="$2"; shift ;;
    *) echo "usage: $0 [--tiny] [--dir DIR]" >&2; exit 2 ;;
  esac
  shift
done
[ -n "$dir" ] || dir=$(mktemp -d "${TMPDIR:-/tmp}/l2a-acceptance.XXXXXX")
mkdir -p "$dir/logs"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
bin=""; [ -x .venv/bin/l2a-train ] && bin=.venv/bin/   # the project's venv, else the commands on PATH
py=${bin:+.venv/bin/}python3

steps=60
if [ "$tiny" = 1 ]; then
  steps=40   # CPU: the same stages, fewer steps (the test suite runs this)
  prep=(prep=quickstart seq_len=1024 max_tokens=120000 sources.retrieval.num_docs=200 tokenizer.train.sample_chars=500000
        tokenizer.estimate_chars=100000 "tokenizer.train.cache_dir=$dir/tokenizers")
  convert=(model=tiny_qwen3 l2a.window=128)
  train=(experiment=quickstart trainer.micro_batch_size=1 trainer.warmup_steps=4 trainer.save_every=20)
  suite=(eval.retrieval.lengths=[512] eval.retrieval.depths=[0.5] eval.retrieval.samples=1 eval.retrieval.max_new_tokens=16
         data.max_rows=2)
  prune_k=2
  export OMP_NUM_THREADS=1
else
  prep=(prep=quickstart seq_len=32768 max_tokens=1500000 sources.retrieval.num_docs=400 "sources.retrieval.length=[20000,400000]"
        workers=8 "tokenizer.train.cache_dir=$dir/tokenizers")
  convert=(model=qwen2_5_1_5b model.path=null
           "model.config={vocab_size: 151936, hidden_size: 1536, intermediate_size: 8960, num_hidden_layers: 28, num_attention_heads: 12, num_key_value_heads: 2, max_position_embeddings: 131072, rope_theta: 5000000.0, rms_norm_eps: 1.0e-6, tie_word_embeddings: true}")
  train=(experiment=qwen2_5_1_5b_32k trainer.global_batch_size=1 trainer.warmup_steps=5 trainer.save_every=0
         trainer.lr=1e-4)
  # one prompt per cell and 16 new tokens: the quick suite's cells in ~1 min on an H200 (eager decoding of
  # the 1.5B model runs at ~11 tokens/s; two prompts and 32 tokens took 167 s, and l2a-prune runs the suite twice)
  suite=(data.max_rows=2 eval.retrieval.samples=1 eval.retrieval.max_new_tokens=16)
  prune_k=14
fi
train+=(name=acceptance "run_root=$dir/runs" "model.path=$dir/l2a" "data.path=$dir/data" trainer.steps=$steps)
run_dir=$dir/runs/acceptance

rows=(); failed=0
# the line of a failed command's log that says why: our one-line errors, else an exception, else the last line
error_line() {
  grep -E '^error:' "$1" | tail -n 1 | grep . || grep -E '^[A-Za-z_.]*(Error|Exception)\b' "$1" | tail -n 1 | grep . ||
    grep -v '^\s*$' "$1" | grep -v 'HYDRA_FULL_ERROR' | tail -n 1
}
# stage NAME FIGURES_COMMAND -- COMMAND...: run COMMAND (log in logs/NAME.log), then a table row
# with its status (ok, or the last error line), its seconds and FIGURES_COMMAND's output.
stage() {
  local name=$1 figures=$2; shift 3
  if [ "$failed" = 1 ]; then rows+=("| $name | not run | | |"); return; fi
  local start=$SECONDS status=ok
  "$@" >"$dir/logs/$name.log" 2>&1
  local rc=$?
  if [ $rc -ne 0 ]; then
    status="exit $rc: $(error_line "$dir/logs/$name.log" | cut -c1-200 | tr '|' '/')"
    failed=1
  fi
  local seconds=$((SECONDS - start)) info=""
  [ "$failed" = 0 ] && info=$(eval "$figures" 2>&1 | tr '\n' ' ' | tr '|' '/')
  rows+=("| $name | $status | $seconds | $info |")
  echo "[$name] $status (${seconds} s) $info" >&2
}

# figures of each stage, from the files the commands wrote
manifest() { $py -c "import json,sys; m=json.load(open('$dir/data/manifest.json')); print(f\"{m['num_rows']} rows x {m['seq_len']} tokens, {m['tokenizer']['vocab_size']}-token tokenizer\")"; }
converted() { $py -c "import json; c=json.load(open('$dir/l2a/config.json')); t=c['l2a_layer_types']; print(f\"{c['model_type']}, {len(t)} layers ({t.count('l2a')} L2A), window {c['l2a_window']}\")"; }
metrics() {  # first/last step of metrics.jsonl: routed fraction, loss, tokens/s, peak memory
  $py - "$run_dir/metrics.jsonl" "$1" <<'EOF'
import json, sys
lines = [json.loads(l) for l in open(sys.argv[1]) if l.strip().startswith("{")]
first, last = lines[0], lines[-1]
if sys.argv[2] == "first":
    print(f"steps {first['step']}-{last['step']}: routed fraction {first['routed_fraction']:.3f} -> {last['routed_fraction']:.3f}, "
          f"lm loss {first['lm_loss']:.3f} -> {last['lm_loss']:.3f}")
else:
    resumed = [l for l in lines if l["step"] > int(sys.argv[2])]
    s = resumed[0]
    print(f"resumed at step {s['step']}; step {last['step']}: routed fraction {last['routed_fraction']:.3f} "
          f"(first step {lines[0]['routed_fraction']:.3f}), lm loss {last['lm_loss']:.3f}, "
          f"{last['tokens_per_s']:.0f} tokens/s, peak {last['peak_mem_gib'] or 0:.1f} GiB")
EOF
}
exported() { $py -c "import os; d='$run_dir/hf'; f=sorted(os.listdir(d)); print(f\"{sum(os.path.getsize(os.path.join(d,x)) for x in f)/2**20:.0f} MiB: {', '.join(x for x in f if x.endswith(('.safetensors','.json')))}\")"; }
evaluated() {
  $py - "$dir/eval/eval.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
routed = [x for x in (r.get("router", {}).get("overall") or []) if x is not None]
print(f"retrieval accuracy {r['retrieval']['accuracy']:.3f}; perplexity {r['perplexity']['all']['ppl']:.1f}; "
      f"routed fraction (mean over L2A layers) {sum(routed) / max(1, len(routed)):.3f}")
EOF
}
pruned() {
  $py - "$dir/pruned/prune_report.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
kv = r["kv_cache"]
print(f"pruned layers {r['pruned_layers']}; KV cache at {kv['length']} tokens {100 * kv['after_vs_full']:.1f}% of full "
      f"attention (was {100 * kv['before_vs_full']:.1f}%); retrieval accuracy {r['eval']['before']['retrieval']['accuracy']:.3f} "
      f"-> {r['eval']['after']['retrieval']['accuracy']:.3f}")
EOF
}
generated() { tail -n 1 "$dir/logs/generate.log" | sed 's/^.*l2a-generate[^:]*: *//'; }

# the training stage: started in the background, SIGTERM once half the steps are logged
train_until_sigterm() {
  "${bin}l2a-train" "${train[@]}" &
  local pid=$! half=$((steps / 2))
  while kill -0 $pid 2>/dev/null; do
    if [ -f "$run_dir/metrics.jsonl" ] && [ "$(grep -c '"step"' "$run_dir/metrics.jsonl")" -ge $half ]; then
      kill -TERM $pid; break
    fi
    sleep 0.5
  done
  wait $pid; local rc=$?
  # (no "error:" prefix here: a failed l2a-train has printed its own error line, which the table shows)
  [ $rc -eq 143 ] || { echo "l2a-train exited $rc, expected 143 (stopped by SIGTERM with a checkpoint)"; return 1; }
  ls -d "$run_dir"/checkpoints/step_* >/dev/null || { echo "no checkpoint after SIGTERM"; return 1; }
}
stopped_step() { $py -c "import json; print([json.loads(l) for l in open('$run_dir/metrics.jsonl') if l.startswith('{')][-1]['step'])"; }

stage prep manifest -- "${bin}l2a-prep" "${prep[@]}" "output=$dir/data"
stage convert converted -- "${bin}l2a-convert" "${convert[@]}" "tokenizer=$dir/data/tokenizer" "output=$dir/l2a"
stage "train (to SIGTERM)" "metrics first" -- train_until_sigterm
[ "$failed" = 0 ] && stopped=$(stopped_step)
stage "train (resumed)" "metrics ${stopped:-0}" -- "${bin}l2a-train" "${train[@]}"
stage "export (hf)" exported -- test -f "$run_dir/hf/model.safetensors"
stage eval evaluated -- "${bin}l2a-eval" "model.path=$run_dir/hf" "data.path=$dir/data" "${suite[@]}" "output=$dir/eval"
stage prune pruned -- "${bin}l2a-prune" "model.path=$run_dir/hf" "calibration.path=$dir/data" "data.path=$dir/data" \
  k=$prune_k "${suite[@]}" "output=$dir/pruned"
stage generate generated -- "${bin}l2a-generate" "model.path=$dir/pruned" "prompt='def fibonacci(n):'" max_new_tokens=32

{
  echo "| stage | status | seconds | key figures |"
  echo "|---|---|---|---|"
  printf '%s\n' "${rows[@]}"
} | tee "$dir/acceptance.md"
echo "work directory: $dir" >&2
exit $failed
