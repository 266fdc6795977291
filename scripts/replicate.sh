#!/usr/bin/env bash
# A one-GPU, small-scale replication of the L2A paper's claims, through the real commands
# (docs/RESULTS.md says what it measures; the configs say why each setting):
#   1. data      l2a-prep: the installed Python packages as code repositories + synthetic
#                retrieval documents, 8K BPE; base rows (C), long rows (4C), held-out rows (4C)
#                (configs/prep/replicate*.yaml)
#   2. base      l2a-train: a 29M-parameter Qwen3-shaped model from scratch, full attention, at
#                C = 4096 (configs/experiment/replicate_base.yaml); its HF export is the base
#   3. arms      l2a-convert + l2a-train at 4C = 16384, RoPE theta 1e4 -> 2e5, arms with the
#                same tokens, order, schedule and trainable set: full, L2A (W = C/8) at two
#                regularizer weights (l2a: lambda_max 5e-7, l2a_strong: 5e-6), SWA, random
#                routing at the chosen L2A arm's measured density, static hybrid at the same
#                budget (configs/experiment/replicate_*.yaml). The chosen L2A arm (the one pruned
#                and matched) is picked from training metrics only, never the evaluation: among
#                the L2A arms whose training LM loss ends within 3% of the full-attention arm's,
#                the one whose density ends nearest the paper's 20% routed.
#   4. eval      l2a-eval of every arm at C, 2C, 4C (configs/eval/replicate.yaml)
#   5. prune     l2a-prune of the L2A arm (the sparsest half of the layers), l2a-eval again
#   6. report    scripts/replicate_report.py: <dir>/results.md, one row per arm
# Prints a Markdown table of the stages (status, seconds, key figures), also <dir>/replicate.md;
# each stage's log is <dir>/logs/<stage>.log.
#
#   bash scripts/replicate.sh                 # one GPU (16 minutes on an H200, measured), in runs/replicate
#   bash scripts/replicate.sh --tiny          # CPU: a tiny model, C = 256, a few steps per stage (the test suite runs it)
#   bash scripts/replicate.sh --dir D         # work directory (default runs/replicate; --tiny: a new temporary one)
#   bash scripts/replicate.sh --budget 540    # stop after about 540 s: a training stage is stopped with a checkpoint
#   bash scripts/replicate.sh --scale 0.1     # GPU sizes, a tenth of the steps and tokens (a check of a machine)
#   bash scripts/replicate.sh --stage-limit S # the longest one stage may run (default 600 s, the 10-minute rule)
#   bash scripts/replicate.sh --jobs 1        # one stage at a time (slower; every arm's tokens/s then has the GPU alone)
#
# Resumable: run the same command again and every stage whose outputs are complete is skipped;
# an unfinished training stage continues from its last checkpoint (trainer.resume=auto), an
# unfinished prep from its finished shards; converts, evals and prunes write atomically (all or
# nothing) and are redone. A stage that reaches its time limit (--stage-limit, or what is left of
# --budget) is stopped with SIGTERM: l2a-train saves a checkpoint and the next run continues it.
# Exit status: 0 all stages done; 1 a stage failed (later stages not run); 3 stopped at a time
# limit (run again to continue).
set -uo pipefail
cd "$(dirname "$0")/.."
tiny=0; dir=""; budget=""; scale=1; stage_limit=600; jobs_arg=""
while [ $# -gt 0 ]; do
  case "$1" in
    --tiny) tiny=1 ;;
    --dir) dir="$2"; shift ;;
    --budget) budget="$2"; shift ;;
    --scale) scale="$2"; shift ;;
    --stage-limit) stage_limit="$2"; shift ;;
    --jobs) jobs_arg="$2"; shift ;;
    *) echo "usage: $0 [--tiny] [--dir DIR] [--budget SECONDS] [--scale FACTOR] [--stage-limit SECONDS] [--jobs N]" >&2; exit 2 ;;
  esac
  shift
done
if [ -n "$jobs_arg" ]; then  # checked before anything is written
  case "$jobs_arg" in *[!0-9]*|0*) echo "error: --jobs $jobs_arg: give a number of stages at a time, at least 1" >&2; exit 2 ;; esac
fi
if [ -z "$dir" ]; then
  if [ "$tiny" = 1 ]; then dir=$(mktemp -d "${TMPDIR:-/tmp}/l2a-replicate.XXXXXX"); else dir=runs/replicate; fi
fi
mkdir -p "$dir/logs"
dir=$(cd "$dir" && pwd)
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
bin=""; [ -x .venv/bin/l2a-train ] && bin=.venv/bin/   # the project's venv, else the commands on PATH
py=${bin:+.venv/bin/}python3
deadline=""; [ -n "$budget" ] && deadline=$((SECONDS + budget))

# ---------------------------------------------------------------------------------------------
# Sizes. GPU: C = 4096, 4C = 16384, W = C/8 = 512, 8 layers (prune k = 4); the step counts and
# token budgets live in the configs (time plan: configs/experiment/replicate_base.yaml).
# --tiny: C = 256, W = 32, 4 layers, a 1024-token BPE, 2-4 steps, stages two at a time on 2 cores.
C=4096; W=512; layers=8; theta=2.0e5
# Stages run side by side where they do not compete: at most `trainers` training stages at once
# (GPU: one, so every arm's tokens/s is measured with the GPU to itself but for the light stages)
# and `jobs` stages in all (GPU: the preps, conversions, prune and evaluations of finished arms
# run beside the training of the next arm; an evaluation decodes one token at a time and leaves
# the GPU mostly idle). --tiny: two stages of any kind at a time on 2 cores.
jobs=3; trainers=1
declare -A lambdas=()   # --tiny only: l2a.regularizer.lambda_max per L2A arm (GPU: the configs')
prep=(progress=false count_unread=false "tokenizer.train.cache_dir=$dir/tokenizers")
base_train=(); arm_train=(); convert=(model.dtype=bfloat16)
suite=(eval=replicate data.max_rows=8); calibration_rows=8
if [ "$tiny" = 1 ]; then
  C=256; W=32; layers=4; jobs=2; trainers=2
  export OMP_NUM_THREADS=1
  prep+=(workers=0 tokenizer.train.vocab_size=1024 tokenizer.train.sample_chars=300000 tokenizer.estimate_chars=100000
         shards.tokens=100000 sources.retrieval.num_docs=400)
  prep_base=(seq_len=$C max_tokens=60000 "sources.retrieval.length=[300,900]")
  prep_long=(seq_len=$((4 * C)) max_tokens=30000 "sources.retrieval.length=[600,3600]")
  prep_heldout=(seq_len=$((4 * C)) max_tokens=4000 "sources.retrieval.length=[600,3600]")
  base_train=(model.dtype=float32 model.config.vocab_size=1024 model.config.hidden_size=64 model.config.intermediate_size=128
              model.config.num_hidden_layers=$layers model.config.num_attention_heads=2 model.config.num_key_value_heads=1
              model.config.head_dim=32 model.config.max_position_embeddings=$C
              trainer.steps=4 trainer.warmup_steps=1 trainer.micro_batch_size=2 trainer.global_batch_size=2
              trainer.precision=fp32 trainer.save_every=0 trainer.lr=3e-3)
  arm_train=(trainer.steps=2 trainer.warmup_steps=1 trainer.micro_batch_size=1 trainer.global_batch_size=1
             trainer.precision=fp32 trainer.save_every=0)
  lambdas=([l2a]=1e-3 [l2a_strong]=4e-2)   # the tiny rows are 16x shorter: a larger weight per token
  convert=(model.dtype=float32)
  suite=(eval=replicate_tiny data.max_rows=1); calibration_rows=1
else
  prep_base=(); prep_long=(); prep_heldout=()
  if [ "$scale" != 1 ]; then  # --scale: the same sizes, FACTOR x the configs' steps and tokens (at least MIN)
    scaled() {  # scaled FILE KEY MIN
      $py -c "import sys, yaml; v = yaml.safe_load(open(sys.argv[1]))
for k in sys.argv[2].split('.'): v = v[k]
print(max(int(sys.argv[3]), round(float(sys.argv[4]) * float(v))))" "$1" "$2" "$3" "$scale"
    }
    prep_base=(max_tokens=$(scaled configs/prep/replicate.yaml max_tokens 3000000))
    prep_long=(max_tokens=$(scaled configs/prep/replicate_long.yaml max_tokens 2000000))
    base_cfg=configs/experiment/replicate_base.yaml arm_cfg=configs/experiment/replicate_arm.yaml
    base_train=(trainer.steps=$(scaled $base_cfg trainer.steps 4) trainer.warmup_steps=$(scaled $base_cfg trainer.warmup_steps 1)
                trainer.save_every=$(scaled $base_cfg trainer.save_every 2))
    arm_train=(trainer.steps=$(scaled $arm_cfg trainer.steps 4) trainer.warmup_steps=$(scaled $arm_cfg trainer.warmup_steps 1)
               trainer.save_every=$(scaled $arm_cfg trainer.save_every 2))
  fi
fi
if [ -n "$jobs_arg" ]; then
  jobs=$jobs_arg; [ "$trainers" -gt "$jobs" ] && trainers=$jobs
fi
L=$((4 * C)); prune_k=$((layers / 2))
base_train+=(data.seq_len=$C); arm_train+=(data.seq_len=$L)
convert+=(model.rope_theta=$theta model.max_position_embeddings=$L l2a.window=$W)

# ---------------------------------------------------------------------------------------------
# Stages: stage_argv NAME sets argv (the command), stage_done NAME says whether its outputs are
# complete, stage_figures NAME prints its key figures. The converts and evals of several arms are
# one command each (a Hydra sweep, -m: one process start instead of one per arm), over the arms
# whose outputs are missing. Every model evaluated is <dir>/runs/replicate_<arm>/hf: the five
# arms' exports and the pruned L2A checkpoint (arm l2a_pruned, written there by l2a-prune).
base_hf=$dir/runs/replicate_base/hf
MAIN=(l2a full swa); MATCHED=(random static)       # converted: before / after the chosen L2A arm's density is known
L2AS=(l2a l2a_strong)   # the L2A arms (both trained from ckpt/l2a); density.json names the chosen one
run_of() { echo "$dir/runs/replicate_$1"; }
hf_of() { echo "$dir/runs/replicate_$1/hf"; }
arms_of() { case "$1" in convert-main) echo "${MAIN[@]}" ;; convert-matched) echo "${MATCHED[@]}" ;; esac; }
eval_arms() { echo "${1#eval-}"; }   # one evaluation stage per model: eval-<arm>
ckpt_of() { case "$1" in l2a_strong) echo "$dir/ckpt/l2a" ;; *) echo "$dir/ckpt/$1" ;; esac; }
comma() { local IFS=,; echo "$*"; }

# The base's export (l2a=full: an L2A checkpoint with every layer global) converts like a plain
# Qwen3 checkpoint: l2a-convert reads it directly.

# Each arm's training figures: mean LM loss and mean routed fraction of the last 10% of its logged
# steps (metrics.jsonl; every arm sees the same rows in the same order). The chosen L2A arm: among
# those whose LM loss is within 3% of the full-attention arm's (the paper's quality margin), the
# one whose density is nearest 20% routed; if none is, the one with the lowest LM loss (the first
# GPU run had an arm at 16% routed whose loss was 42% above full attention's: density alone would
# have kept it). Training figures only: the evaluation plays no part. The random arm routes at the
# chosen arm's rate, the static arm keeps every k-th layer global with k giving the nearest share
# of global layers (ties: fewer global layers).
read -r -d '' DENSITY <<'PY'
import json, sys
layers, out, full, runs = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4:]
def tail(run, key):
    lines = [json.loads(l) for l in open(run + "/metrics.jsonl") if l.strip().startswith("{")]
    lines = [l for l in lines if l.get(key) is not None]
    if not lines:
        sys.exit(f"error: {run}/metrics.jsonl holds no {key}")
    last = lines[-max(1, len(lines) // 10):]
    return sum(l[key] for l in last) / len(last), len(last), lines[-1]["step"]
full_loss = tail(full, "lm_loss")[0]
arms = {}
for run in runs:
    density, n, step = tail(run, "routed_fraction")
    loss = tail(run, "lm_loss")[0]
    arms[run.rsplit("/replicate_", 1)[1]] = {"density": density, "lm_loss": loss, "lm_loss_vs_full": loss / full_loss - 1,
                                             "steps_averaged": n, "last_step": step}
within = [a for a in arms if arms[a]["lm_loss_vs_full"] <= 0.03]
arm = (min(within, key=lambda a: abs(arms[a]["density"] - 0.2)) if within
       else min(arms, key=lambda a: arms[a]["lm_loss"]))
density = arms[arm]["density"]
rate = round(min(1.0, max(0.0, density)), 4)
k = min(range(1, layers + 1), key=lambda k: (abs(layers // k / layers - density), -k))
info = {"arm": arm, **arms[arm], "arms": arms, "full_lm_loss": full_loss, "rule": "within 3% of full's LM loss, nearest 0.2 routed"
        if within else "none within 3% of full's LM loss: the lowest LM loss", "random_rate": rate,
        "static_every": k, "static_global_layers": layers // k, "layers": layers}
open(out, "w").write(json.dumps(info, indent=2) + "\n")
print(json.dumps(info))
PY
density_value() { $py -c "import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])" "$dir/density.json" "$1"; }

# 0 when the outputs of one arm of a convert / eval stage are there and newer than their input
convert_done() {
  [ -f "$dir/ckpt/$1/model.safetensors" ] && [ "$dir/ckpt/$1/config.json" -nt "$base_hf/config.json" ] &&
    { [ "$1" != random ] && [ "$1" != static ] || [ "$dir/ckpt/$1/config.json" -nt "$dir/density.json" ]; }
}
eval_done() { [ -f "$dir/eval/$1/eval.json" ] && [ "$dir/eval/$1/eval.json" -nt "$(hf_of "$1")/config.json" ]; }
missing() {  # the arms of stage $1 whose outputs are not complete
  local arm out=()
  case "$1" in
    convert-*) for arm in $(arms_of "$1"); do convert_done "$arm" || out+=("$arm"); done ;;
    eval-*) for arm in $(eval_arms "$1"); do eval_done "$arm" || out+=("$arm"); done ;;
  esac
  echo "${out[@]}"
}

stage_argv() {
  local name=$1 arm=${1#*-}
  case "$name" in
    prep-base) argv=("${bin}l2a-prep" prep=replicate "output=$dir/data/base" "${prep[@]}" "${prep_base[@]}") ;;
    prep-long) argv=("${bin}l2a-prep" prep=replicate_long "output=$dir/data/long" "tokenizer.path=$dir/data/base/tokenizer"
                     "${prep[@]}" "${prep_long[@]}") ;;
    prep-heldout) argv=("${bin}l2a-prep" prep=replicate_heldout "output=$dir/data/heldout" "tokenizer.path=$dir/data/base/tokenizer"
                        "${prep[@]}" "${prep_heldout[@]}") ;;
    train-base) argv=("${bin}l2a-train" experiment=replicate_base "data.path=$dir/data/base" "run_root=$dir/runs" "${base_train[@]}") ;;
    convert-*)  # one conversion per arm (l2a=<arm>), into ckpt/<arm>
      local extra=()
      [ "$name" = convert-matched ] && extra=(l2a.random_rate=$(density_value random_rate) l2a.static_every=$(density_value static_every))
      argv=("${bin}l2a-convert" -m "l2a=$(comma $(missing "$name"))" "model.path=$base_hf" "${convert[@]}" "${extra[@]}"
            "output=$dir/ckpt/\${l2a.mode}" overwrite=true "hydra.sweep.dir=$dir/logs/hydra-$name") ;;
    train-*)
      local extra=()
      [ "$arm" = random ] && extra=(l2a.random_rate=$(density_value random_rate))
      [ -n "${lambdas[$arm]:-}" ] && extra+=(l2a.regularizer.lambda_max=${lambdas[$arm]})
      argv=("${bin}l2a-train" "experiment=replicate_$arm" "model.path=$(ckpt_of "$arm")" "data.path=$dir/data/long"
            "run_root=$dir/runs" "${arm_train[@]}" "${extra[@]}") ;;
    density)
      local runs=() a; for a in "${L2AS[@]}"; do runs+=("$(run_of "$a")"); done
      argv=("$py" -c "$DENSITY" "$layers" "$dir/density.json" "$(run_of full)" "${runs[@]}") ;;
    prune) argv=("${bin}l2a-prune" "model.path=$(hf_of "$(density_value arm)")" "calibration.path=$dir/data/heldout" calibration.max_rows=$calibration_rows
                 k=$prune_k eval_change=false kv_length=$L "output=$(hf_of l2a_pruned)" overwrite=true) ;;
    eval-*) argv=("${bin}l2a-eval" -m "+arm=$(comma $(missing "$name"))" "model.path=$dir/runs/replicate_\${arm}/hf"
                  "data.path=$dir/data/heldout" "${suite[@]}" "output=$dir/eval/\${arm}" overwrite=true
                  "hydra.sweep.dir=$dir/logs/hydra-$name") ;;
    report) argv=("$py" scripts/replicate_report.py "$dir") ;;
    *) echo "unknown stage $name" >&2; return 1 ;;
  esac
}

# 0 when the stage's outputs are complete (then it is skipped; `report` always runs)
stage_done() {
  local name=$1 arm=${1#*-}
  case "$name" in
    prep-*) [ -f "$dir/data/$arm/manifest.json" ] ;;
    train-*) [ -f "$(run_of "$arm")/hf/model.safetensors" ] &&
               { [ "$arm" = base ] || [ "$(run_of "$arm")/summary.json" -nt "$(ckpt_of "$arm")/config.json" ]; } &&
               $py -c "import json,sys; sys.exit(json.load(open(sys.argv[1])).get('status') != 'done')" "$(run_of "$arm")/summary.json" 2>/dev/null ;;
    convert-*|eval-*) [ -z "$(missing "$name")" ] ;;
    density) [ -f "$dir/density.json" ] && [ "$dir/density.json" -nt "$(run_of l2a)/summary.json" ] &&
               [ "$dir/density.json" -nt "$(run_of l2a_strong)/summary.json" ] && [ "$dir/density.json" -nt "$(run_of full)/summary.json" ] ;;
    prune) [ -f "$(hf_of l2a_pruned)/prune_report.json" ] && [ "$(hf_of l2a_pruned)/prune_report.json" -nt "$dir/density.json" ] ;;
    *) return 1 ;;
  esac
}

stage_figures() {
  local name=$1 arm=${1#*-} a
  case "$name" in
    prep-*) $py -c "import json,sys; m=json.load(open(sys.argv[1])); d=m['domains']; print(f\"{m['num_rows']} rows x {m['seq_len']} tokens, {m['tokens']/1e6:.2f}M tokens (\" + ', '.join(f'{k} {v[\"achieved\"]:.2f}' for k, v in d.items()) + f\"), {m['tokenizer']['vocab_size']}-token BPE\")" "$dir/data/$arm/manifest.json" ;;
    train-*) $py -c "import json,sys; s=json.load(open(sys.argv[1])); f=lambda x, p: '-' if x is None else format(x, p); print(f\"{s['steps']} steps, {f(s.get('tokens'), ',')} tokens, final LM loss {f(s['final_loss'], '.3f')}, skip rate {f(s['final_skip_rate'], '.3f')}, {f(s['tokens_per_s'], ',.0f')} tokens/s, peak {f(s.get('peak_mem_gib'), '.1f')} GiB\")" "$(run_of "$arm")/summary.json" ;;
    convert-*)
      local dirs=(); for a in $(arms_of "$name"); do dirs+=("$dir/ckpt/$a"); done
      $py -c "
import json, os, sys
for d in sys.argv[1:]:
    c = json.load(open(d + '/config.json')); t = c.get('l2a_layer_types') or ['global'] * c['num_hidden_layers']
    print(f\"{os.path.basename(d)}: {c['model_type']}, layers {''.join(x[0] for x in t)}, window {c.get('l2a_window', '-')}, \"
          f\"rope theta {c['rope_parameters']['rope_theta']:g}, {c['max_position_embeddings']} positions, \"
          f\"{os.path.getsize(d + '/model.safetensors') / 2**20:.1f} MiB;\")" "${dirs[@]}" ;;
    density) $py -c "import json,sys; d=json.load(open(sys.argv[1])); print(', '.join(f\"{a} density {v['density']:.4f}, LM loss {100*v['lm_loss_vs_full']:+.1f}% vs full\" for a, v in d['arms'].items()) + f\"; chosen {d['arm']} (last {d['steps_averaged']} steps) -> random_rate {d['random_rate']}, static_every {d['static_every']} ({d['static_global_layers']}/{d['layers']} layers global)\")" "$dir/density.json" ;;
    prune) $py -c "import json,sys; r=json.load(open(sys.argv[1])); kv=r['kv_cache']; print(f\"pruned layers {r['pruned_layers']}; KV cache at {kv['length']} tokens {100*kv['before_vs_full']:.1f}% -> {100*kv['after_vs_full']:.1f}% of full attention\")" "$(hf_of l2a_pruned)/prune_report.json" ;;
    eval-*) for a in $(eval_arms "$name"); do
      $py -c "import json,sys; r=json.load(open(sys.argv[1])); ret=r['retrieval']; t=list(ret['tasks'].values()); b=r['perplexity']['buckets'][-1]; print(sys.argv[2] + ': retrieval ' + '/'.join(f\"{sum(x['by_length'][str(L)] for x in t)/len(t):.2f}\" for L in ret['lengths']) + f\" at {'/'.join(str(L) for L in ret['lengths'])}, ppl {b['bucket']} {b['ppl']:.2f};\")" "$dir/eval/$a/eval.json" "$a"
      done ;;
    report) echo "$dir/results.md" ;;
  esac
}

# the line of a failed command's log that says why: our one-line errors, else an exception, else the last line
error_line() {
  grep -E '^error:' "$1" | tail -n 1 | grep . || grep -E '^[A-Za-z_.]*(Error|Exception)\b' "$1" | tail -n 1 | grep . ||
    grep -v '^\s*$' "$1" | grep -v 'HYDRA_FULL_ERROR' | tail -n 1
}

# run_stage NAME: skip it if complete, else run it under its time limit; writes logs/NAME.{row,rc}
run_stage() {
  local name=$1 start=$SECONDS status=ok rc=0 limit=$stage_limit log=$dir/logs/$1.log shown
  if [ "$name" != report ] && stage_done "$name"; then
    status="done (outputs complete, skipped)"
  else
    if [ -n "$deadline" ] && [ $((deadline - SECONDS)) -lt "$limit" ]; then limit=$((deadline - SECONDS)); fi
    [ "$name" = report ] && limit=120  # the summary table: always (seconds)
    if [ "$limit" -lt 20 ] && [ "$name" != report ]; then
      status="not run: time budget spent (run again to continue)"; rc=3
    elif ! stage_argv "$name"; then
      status="cannot build its command"; rc=1
    else
      # SIGTERM at the limit: l2a-train saves a checkpoint and exits; SIGKILL 120 s later if it hangs.
      # In the background so that a signal to this script reaches it (the trap below forwards it).
      if [ "${argv[1]:-}" = -c ]; then shown=("${argv[0]}" -c "<the ${name} snippet of scripts/replicate.sh>" "${argv[@]:3}")
      else shown=("${argv[@]}"); fi
      { printf '$'; printf ' %q' "${shown[@]}"; printf '\n'; } >"$log"   # the command, then its output
      timeout --signal=TERM --kill-after=120 "$limit" "${argv[@]}" >>"$log" 2>&1 &
      local pid=$!
      echo $pid >"$dir/logs/$name.pid"
      wait $pid; rc=$?
      while kill -0 $pid 2>/dev/null; do wait $pid; rc=$?; done  # a trapped signal interrupted the wait
      rm -f "$dir/logs/$name.pid"
      if [ $rc -eq 124 ] || [ $rc -eq 137 ] || [ $rc -eq 143 ]; then
        local why="its time limit ($limit s)"; [ -f "$dir/logs/interrupted" ] && why="a signal"
        status="stopped by $why$(case $name in train-*) echo ' with a checkpoint';; esac): run again to continue"; rc=3
      elif [ $rc -ne 0 ]; then
        status="exit $rc: $(error_line "$log" | cut -c1-200 | tr '|' '/')"; rc=1
      elif [ "$name" != report ] && ! stage_done "$name"; then
        status="exit 0 but its outputs are incomplete (see logs/$name.log)"; rc=1
      fi
    fi
  fi
  local seconds=$((SECONDS - start)) info=""
  [ $rc -eq 0 ] && info=$(stage_figures "$name" 2>&1 | tr '\n' ' ' | tr '|' '/')
  echo "| $name | $status | $seconds | $info |" >"$dir/logs/$name.row"
  echo $rc >"$dir/logs/$name.rc"
  echo "[$name] $status (${seconds} s) $info" >&2
}

# The stages and what each needs. A stage starts as soon as what it needs is done and a place is
# free (`jobs`, `trainers` above), earliest in this list first: the training stages in the order
# they run (the L2A arms first: their density sets the matched arms), the light stages that
# unblock a training stage before the evaluations. After a failure or a time limit no new stage
# starts (those already running finish); the report runs in any case.
declare -A needs state
stages=()
add() { local name=$1; shift; stages+=("$name"); needs[$name]="$*"; state[$name]=pending; }
add prep-base
add train-base prep-base
add prep-long prep-base
add prep-heldout prep-base
add convert-main train-base
add train-l2a convert-main prep-long
add train-l2a_strong convert-main prep-long
add train-full convert-main prep-long
add density train-l2a train-l2a_strong train-full
add convert-matched density
add train-swa convert-main prep-long
add train-random convert-matched prep-long
add train-static convert-matched prep-long
add prune density prep-heldout
for arm in l2a l2a_strong full swa; do add "eval-$arm" "train-$arm" prep-heldout; done
add eval-l2a_pruned prune prep-heldout
for arm in random static; do add "eval-$arm" "train-$arm" prep-heldout; done

interrupt() {  # forward a signal to the running commands (l2a-train checkpoints on SIGTERM)
  touch "$dir/logs/interrupted"
  local f; for f in "$dir"/logs/*.pid; do [ -f "$f" ] && kill -TERM "$(cat "$f")" 2>/dev/null; done
}
trap interrupt INT TERM
rm -f "$dir"/logs/*.row "$dir"/logs/*.rc "$dir"/logs/*.pid "$dir/logs/interrupted"

echo "replicate: work directory $dir ($([ $tiny = 1 ] && echo "--tiny, CPU, $jobs stages at a time" || echo "GPU sizes, scale $scale"); C=$C, 4C=$L, W=$W)" >&2
failed=0; running=0; training=0
collect() {  # note the stages that finished
  local name rc
  for name in "${stages[@]}"; do
    [ "${state[$name]}" = running ] && [ -f "$dir/logs/$name.rc" ] || continue
    rc=$(cat "$dir/logs/$name.rc"); running=$((running - 1))
    case $name in train-*) training=$((training - 1)) ;; esac
    if [ "$rc" = 0 ]; then state[$name]=ok
    elif [ "$rc" = 3 ]; then state[$name]=stopped; [ "$failed" = 1 ] || failed=3
    else state[$name]=failed; failed=1
    fi
  done
}
while :; do
  launched=0
  if [ "$failed" = 0 ] && [ ! -f "$dir/logs/interrupted" ]; then
    for name in "${stages[@]}"; do
      [ "${state[$name]}" = pending ] && [ "$running" -lt "$jobs" ] || continue
      case $name in train-*) [ "$training" -lt "$trainers" ] || continue ;; esac
      ready=1; for need in ${needs[$name]}; do [ "${state[$need]}" = ok ] || ready=0; done
      [ "$ready" = 1 ] || continue
      state[$name]=running; running=$((running + 1)); launched=1
      case $name in train-*) training=$((training + 1)) ;; esac
      run_stage "$name" &
    done
  fi
  [ "$running" -gt 0 ] || [ "$launched" = 1 ] || break
  if [ "$running" -gt 0 ]; then wait -n; collect; fi
done
wait
[ -f "$dir/logs/interrupted" ] && [ "$failed" = 0 ] && failed=3
for name in "${stages[@]}"; do
  [ -f "$dir/logs/$name.row" ] || echo "| $name | not run | | |" >"$dir/logs/$name.row"
done
# the summary table, whatever happened before (cells of missing results stay "-")
stages+=(report); run_stage report
[ "$(cat "$dir/logs/report.rc")" = 0 ] || [ "$failed" != 0 ] || failed=1

{
  echo "| stage | status | seconds | key figures |"
  echo "|---|---|---|---|"
  for name in "${stages[@]}"; do cat "$dir/logs/$name.row"; done
  echo
  echo "Wall time of this run: $SECONDS s (stages run side by side: their seconds overlap)."
} | tee "$dir/replicate.md"
[ -f "$dir/results.md" ] && { echo; cat "$dir/results.md"; }
echo "work directory: $dir" >&2
exit $failed
