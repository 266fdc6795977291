"""The summary table of the replication recipe (scripts/replicate.sh, last stage).

    python scripts/replicate_report.py <dir>          # writes <dir>/results.md and <dir>/results.json

Reads only what the recipe's commands wrote under <dir>:
  runs/replicate_<arm>/summary.json    l2a-train: final skip rate, tokens/s, final LM loss
  eval/<arm>/eval.json                 l2a-eval: retrieval accuracy per length, perplexity by position
  runs/replicate_l2a_pruned/hf/prune_report.json   l2a-prune: pruned layers, KV-cache bytes
  density.json                         the L2A arms' measured densities and the chosen one
                                       (the one pruned; the random / static arms' budget)
One row per arm (full, l2a, l2a_strong, swa, random, static) and one for the pruned L2A model. A missing
file leaves its cells at "-" (the table is written whatever stage the run reached).
No third-party imports: it runs with any Python 3.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ARMS = ("full", "l2a", "l2a_strong", "swa", "random", "static")
LABELS = {
    "full": "full attention",
    "l2a": "L2A (learned router)",
    "l2a_strong": "L2A, stronger regularizer",
    "swa": "SWA only",
    "random": "random routing",
    "static": "static hybrid",
    "l2a_pruned": "L2A, pruned",
}


def load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def label(n: int) -> str:
    return f"{n // 1024}K" if n and n % 1024 == 0 else str(n)


def fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def retrieval_by_length(ev: dict | None) -> dict[int, float]:
    """Mean over tasks of each task's accuracy at a length (each the mean over depths)."""
    ret = (ev or {}).get("retrieval")
    if not ret:
        return {}
    tasks = list(ret["tasks"].values())
    return {int(L): sum(t["by_length"][str(L)] for t in tasks) / len(tasks) for L in ret["lengths"]}


def last_bucket(ev: dict | None) -> dict | None:
    buckets = ((ev or {}).get("perplexity") or {}).get("buckets") or []
    return buckets[-1] if buckets else None


def global_share(ev: dict | None, density: dict | None) -> float | None:
    """Global-attention share per (token, layer) at evaluation: 1 for a global layer, 0 for an SWA
    layer, the measured routed fraction for a learned-router L2A layer (the configured rate for
    random routing)."""
    model = (ev or {}).get("model")
    if not model:
        return None
    types = model["layer_types"]
    overall = ((ev.get("router") or {}).get("overall")) or [None] * len(types)
    total = 0.0
    for kind, routed in zip(types, overall):
        if kind == "global":
            total += 1.0
        elif kind == "l2a":
            if model.get("routing") == "random":
                routed = (density or {}).get("random_rate")
            if routed is None:
                return None
            total += float(routed)
    return total / len(types)


def final_lambda(root: Path, arm: str) -> float | None:
    """The regularizer weight of an arm's last logged step (lambda_max for the linear ramp)."""
    try:
        lines = (root / "runs" / f"replicate_{arm}" / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return None
    last = [json.loads(l) for l in lines if l.strip().startswith("{")]
    return last[-1].get("lambda") if last else None


def rows(root: Path) -> list[dict]:
    density = load(root / "density.json")
    out = []
    for arm in (*ARMS, "l2a_pruned"):
        ev = load(root / "eval" / arm / "eval.json")
        run = load(root / "runs" / f"replicate_{arm}" / "summary.json") if arm in ARMS else None
        prune = load(root / "runs" / "replicate_l2a_pruned" / "hf" / "prune_report.json") if arm == "l2a_pruned" else None
        bucket = last_bucket(ev)
        model = (ev or {}).get("model") or {}
        out.append({
            "arm": arm,
            "label": LABELS[arm],
            "retrieval": retrieval_by_length(ev),
            "retrieval_mean": ((ev or {}).get("retrieval") or {}).get("accuracy"),
            "ppl_last_bucket": bucket["ppl"] if bucket else None,
            "last_bucket": bucket["bucket"] if bucket else None,
            "ppl_all": (((ev or {}).get("perplexity") or {}).get("all") or {}).get("ppl"),
            "skip_rate_train": (run or {}).get("final_skip_rate"),
            "global_share_eval": global_share(ev, density),
            "tokens_per_s": (run or {}).get("tokens_per_s"),
            "final_lm_loss": (run or {}).get("final_loss"),
            "train_status": (run or {}).get("status"),
            "layer_types": model.get("layer_types"),
            "kv_length": model.get("kv_length"),
            "kv_cache_vs_full": model.get("kv_cache_vs_full"),
            "pruned_layers": (prune or {}).get("pruned_layers"),
            "prune_kv_cache": (prune or {}).get("kv_cache"),
        })
    return out


def markdown(root: Path, table: list[dict]) -> str:
    lengths = sorted({L for r in table for L in r["retrieval"]})
    density = load(root / "density.json")
    bucket = next((r["last_bucket"] for r in table if r["last_bucket"]), "last")
    kv_length = next((r["kv_length"] for r in table if r["kv_length"]), None)
    header = ["arm", *[f"retrieval {label(L)}" for L in lengths], "retrieval mean", f"ppl {bucket}", "ppl all",
              "skip rate (train)", "global share (eval)", "train tokens/s", "final LM loss",
              f"KV cache {label(kv_length) if kv_length else ''} vs full"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for r in table:
        cells = [r["label"], *[fmt(r["retrieval"].get(L), ".3f") for L in lengths], fmt(r["retrieval_mean"], ".3f"),
                 fmt(r["ppl_last_bucket"], ".2f"), fmt(r["ppl_all"], ".2f"), fmt(r["skip_rate_train"], ".3f"),
                 fmt(r["global_share_eval"], ".3f"), fmt(r["tokens_per_s"], ",.0f"), fmt(r["final_lm_loss"], ".3f"),
                 "-" if r["kv_cache_vs_full"] is None else f"{100 * r['kv_cache_vs_full']:.2f}%"]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [
        "",
        "retrieval: RULER-style accuracy (string match of every expected value) of the four tasks "
        "(single needle, multi-key, multi-value, multi-query), mean over tasks and needle depths, at each "
        "context length; ppl: perplexity of held-out tokens by their position in the document; skip rate "
        "(train): fraction of (token, layer) pairs without global attention at the last training step "
        "(L2A layers; all layers for the static hybrid); global share (eval): global attention per "
        "(token, layer) on the evaluation prompts and rows; train tokens/s: mean over the training steps; "
        "KV cache: bf16, batch 1, against full attention.",
    ]
    if density:
        measured = "; ".join(f"{LABELS.get(a, a)}: lambda_max {fmt(final_lambda(root, a), 'g')}, density {v['density']:.4f}, "
                             f"LM loss {fmt(v.get('lm_loss'), '.4f')} ({fmt(100 * v['lm_loss_vs_full'] if 'lm_loss_vs_full' in v else None, '+.1f')}% vs full)"
                             for a, v in density.get("arms", {}).items())
        notes += ["", f"L2A arms (means of the last 10% of their training steps): {measured}. Chosen ({density.get('rule', '-')}; "
                      f"pruned, and the budget of the matched arms): {LABELS.get(density.get('arm'), '-')} "
                      f"-> random arm l2a.random_rate={density['random_rate']}, "
                      f"static arm l2a.static_every={density['static_every']} ({density['static_global_layers']} of "
                      f"{density['layers']} layers global)."]
    pruned = next((r for r in table if r["arm"] == "l2a_pruned"), None)
    if pruned and pruned["prune_kv_cache"]:
        kv = pruned["prune_kv_cache"]
        notes += ["", f"Pruned: layers {pruned['pruned_layers']} lost global attention; KV cache at "
                      f"{label(kv['length'])} tokens {100 * kv['before_vs_full']:.1f}% -> {100 * kv['after_vs_full']:.1f}% "
                      f"of full attention ({kv['before'] / 2**20:.2f} -> {kv['after'] / 2**20:.2f} MiB)."]
    return f"# Replication summary: {root}\n\n" + "\n".join(lines + notes) + "\n"


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    root = Path(argv[0])
    table = rows(root)
    (root / "results.json").write_text(json.dumps(table, indent=2) + "\n")
    text = markdown(root, table)
    (root / "results.md").write_text(text)
    print(text, end="")
    missing = [r["arm"] for r in table if r["retrieval_mean"] is None]
    if missing:
        print(f"no eval.json for: {', '.join(missing)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
