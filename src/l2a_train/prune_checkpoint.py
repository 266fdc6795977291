"""What `l2a-prune` does: post-training pruning of L2A layers whose router (almost) never fires
(the in-model operation is `l2a_train.model.pruning`).

    l2a-prune model.path=checkpoints/quickstart-l2a calibration.path=data/quickstart output=checkpoints/quickstart-pruned
    l2a-prune model.path=/ckpt/qwen3-8b-l2a k=18 eval=ruler data.path=/data/heldout output=/ckpt/qwen3-8b-l2a-pruned

1. measure each L2A layer's routed fraction on a calibration set (packed rows, or the eval
   suite's retrieval prompts when `calibration.path` is null) and rank the layers by it;
2. choose the layers under `threshold`, or the `k` sparsest;
3. run the eval suite before and after (`eval_change`), turning the chosen layers into SWA
   layers (`l2a_train.model.prune_layers`: global weights deleted, W-sized cache);
4. write the pruned checkpoint, its tokenizer and `prune_report.json` / `prune_report.md`
   (KV-cache bytes at `kv_length` before and after, the eval change) through a temporary
   directory renamed at the end: a failure at any step leaves nothing behind.

Bad input (a checkpoint that is not L2A, a threshold outside (0, 1] or k=0, an eval length beyond
the model's positions or too short for a task, calibration or held-out data of another tokenizer,
an existing output) is one line and exit status 2, before any heavy work. A rule that matches no
layer after calibration is refused too, rather than writing an unpruned copy.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from l2a_common import UserError

from .atomic import write_atomically
from .checkpoint_config import read_config
from .data import check_tokenizer_matches
from .devices import resolve_device
from .evaluation import check_kv_length, check_suite, kv_report, loading, open_data, retrieval, run_suite
from .evaluation.perplexity import label
from .model import prune_layers

log = logging.getLogger("l2a-prune")


def check_settings(cfg) -> tuple[float, int | None]:
    threshold = cfg.get("threshold")
    try:
        threshold = float(threshold)
    except (TypeError, ValueError):
        raise UserError(f"threshold={threshold!r}: give a routed fraction in [0, 1]") from None
    if not 0.0 <= threshold <= 1.0 or math.isnan(threshold):
        raise UserError(f"threshold={threshold}: must be in [0, 1] (a routed fraction)")
    k = cfg.get("k")
    if k is not None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise UserError(f"k={k!r}: give the number of L2A layers to prune (an integer >= 1), or k=null")
        if k == 0:  # the output would be an unpruned copy, reported as a pruned checkpoint
            raise UserError("k=0 prunes no layer: give the number of sparsest L2A layers to prune (k >= 1), "
                            "or k=null to prune the layers under `threshold`")
    elif threshold == 0.0:  # a routed fraction is never below 0
        raise UserError("threshold=0 prunes no layer (no routed fraction is below 0): give a threshold in (0, 1], "
                        "e.g. threshold=0.05, or k=<number of layers> to prune the k sparsest")
    check_kv_length(cfg.kv_length)
    return threshold, k


def check_layers(path: Path, k: int | None) -> None:
    """L2A layers left to prune, and at least k of them: from config.json, before the model loads."""
    types = list(read_config(path).get("l2a_layer_types") or [])
    if "l2a" not in types:
        raise UserError(f"model.path={path} has no L2A layers left to prune (layer types {types})")
    if k is not None and k > types.count("l2a"):
        raise UserError(f"k={k}: the model has only {types.count('l2a')} L2A layers")


@torch.no_grad()
def calibrate(model, tokenizer, cfg, device) -> tuple[list[float], str]:
    """Routed fraction per layer, token-weighted, on the calibration set."""
    total = torch.zeros(len(model.model.layers), dtype=torch.float64)
    tokens = 0
    if cfg.calibration.path:
        from .data import position_ids

        dataset = open_data(cfg.calibration.path, model, loading.max_positions(model))
        rows = min(int(cfg.calibration.max_rows), dataset.num_rows)
        for row in range(rows):
            ids, starts = dataset.row(row)
            pos = torch.from_numpy(position_ids(starts, dataset.seq_len))[None].to(device)
            out = model.model(input_ids=torch.from_numpy(ids.astype("int64"))[None].to(device), position_ids=pos)
            total += out.routed_fraction.double().cpu() * dataset.seq_len
            tokens += dataset.seq_len
        return (total / tokens).tolist(), f"{rows} rows x {dataset.seq_len} tokens of {cfg.calibration.path}"
    suite = cfg.eval.retrieval
    count = retrieval.token_counter(tokenizer)
    prompts = 0
    for name, spec, length, depth, seed in calibration_cells(suite):
        prompt = retrieval.fitted_prompt(seed, spec, length - int(suite.max_new_tokens), depth, tokenizer, count)
        ids = tokenizer(prompt.text)["input_ids"]
        out = model.model(input_ids=torch.tensor([ids], device=device))
        total += out.routed_fraction.double().cpu() * len(ids)
        tokens += len(ids)
        prompts += 1
    return (total / tokens).tolist(), f"{prompts} synthetic retrieval prompts ({tokens} tokens; calibration.path=null)"


def calibration_cells(suite):
    """The calibration prompts without calibration.path: one per task and length, needles at
    mid depth, seeded apart from the eval suite's prompts (the eval change is measured on others)."""
    for name, spec in retrieval.tasks_of(suite).items():
        for length in [int(x) for x in suite.lengths]:
            yield name, spec, length, 0.5, f"calibration:{suite.seed}:{name}:{length}"


def choose(fractions: list[float], layer_types: list[str], threshold: float, k: int | None) -> tuple[list[dict], list[int], str]:
    candidates = [i for i, kind in enumerate(layer_types) if kind == "l2a"]
    ranking = sorted(candidates, key=lambda i: (fractions[i], i))
    if k is not None:
        if k > len(candidates):
            raise UserError(f"k={k}: the model has only {len(candidates)} L2A layers")
        chosen, rule = ranking[:k], f"the {k} sparsest L2A layers"
    else:
        chosen, rule = [i for i in ranking if fractions[i] < threshold], f"routed fraction < {threshold}"
    return [{"layer": i, "routed_fraction": fractions[i]} for i in ranking], sorted(chosen), rule


def eval_change(before: dict, after: dict) -> dict:
    change: dict = {}
    if "retrieval" in before:
        tasks = {}
        for name, b in before["retrieval"]["tasks"].items():
            a = after["retrieval"]["tasks"][name]["accuracy"]
            tasks[name] = {"before": b["accuracy"], "after": a, "delta": a - b["accuracy"]}
        b, a = before["retrieval"]["accuracy"], after["retrieval"]["accuracy"]
        change["retrieval"] = {"tasks": tasks, "mean": {"before": b, "after": a, "delta": a - b}}
    if "perplexity" in before:
        rows = []
        for b, a in zip([*before["perplexity"]["buckets"], before["perplexity"]["all"]],
                        [*after["perplexity"]["buckets"], after["perplexity"]["all"]]):
            ratio = a["ppl"] / b["ppl"] if a["ppl"] and b["ppl"] else None
            rows.append({"bucket": b.get("bucket", "all"), "before": b["ppl"], "after": a["ppl"], "ratio": ratio})
        change["perplexity"] = rows
    return change


def markdown(rep: dict) -> str:
    f = lambda x, d=3: "-" if x is None else f"{x:.{d}f}"  # noqa: E731
    kv = rep["kv_cache"]
    mib = lambda b: f"{b / 2**20:.1f} MiB"  # noqa: E731
    lines = [
        f"# Pruning `{rep['source']}`",
        "",
        f"Calibration: {rep['calibration']['data']}. Rule: {rep['rule']}. "
        f"Pruned {len(rep['pruned_layers'])} of {rep['layer_types_before'].count('l2a')} L2A layers: {rep['pruned_layers']}.",
        "",
        "| layer | routed fraction | pruned |",
        "|---|---|---|",
        *[f"| {r['layer']} | {f(r['routed_fraction'], 4)} | {'yes' if r['layer'] in rep['pruned_layers'] else ''} |"
          for r in rep["calibration"]["ranking"]],
        "",
        f"KV cache at {label(kv['length'])} tokens (bf16, batch 1):",
        "",
        "| model | bytes | vs full attention |",
        "|---|---|---|",
        f"| full attention | {mib(kv['full_attention'])} | 100.0% |",
        f"| before pruning | {mib(kv['before'])} | {100 * kv['before_vs_full']:.1f}% |",
        f"| after pruning | {mib(kv['after'])} | {100 * kv['after_vs_full']:.1f}% |",
    ]
    change = rep.get("eval", {}).get("change", {})
    if "retrieval" in change:
        lines += ["", "Retrieval accuracy:", "", "| task | before | after | change |", "|---|---|---|---|"]
        for name, t in [*change["retrieval"]["tasks"].items(), ("mean", change["retrieval"]["mean"])]:
            lines.append(f"| {name} | {f(t['before'])} | {f(t['after'])} | {t['delta']:+.3f} |")
    if "perplexity" in change:
        lines += ["", "Perplexity:", "", "| positions | before | after | after / before |", "|---|---|---|---|"]
        for r in change["perplexity"]:
            lines.append(f"| {r['bucket']} | {f(r['before'], 2)} | {f(r['after'], 2)} | {f(r['ratio'])} |")
    return "\n".join(lines) + "\n"


def prune(cfg) -> dict:
    start = time.time()
    output = Path(cfg.output)
    if output.exists() and not cfg.overwrite:  # fail before any heavy work
        raise UserError(f"output={output} already exists; choose another directory or pass overwrite=true")
    threshold, k = check_settings(cfg)
    kind = loading.checkpoint_type(cfg.model.get("path"))
    if not kind.startswith("l2a_"):
        raise UserError(
            f"model.path={cfg.model.path} holds a '{kind}' model, not an L2A checkpoint: only L2A layers can be "
            "pruned (convert it with l2a-convert and train it with l2a-train first)"
        )
    check_layers(Path(cfg.model.path), k)
    positions = loading.configured_positions(cfg.model)
    data = {"calibration.path": cfg.calibration.path, "data.path": cfg.data.path if cfg.eval_change else None}
    check_tokenizer_matches(cfg.model.path, data, bool(cfg.data.allow_tokenizer_mismatch))
    needs_tokenizer = not cfg.calibration.path or (cfg.eval_change and cfg.eval.retrieval.enabled)
    tokenizer = loading.load_tokenizer(cfg.tokenizer, cfg.model.path, cfg.calibration.path or cfg.data.path,
                                       required=needs_tokenizer)
    if cfg.eval_change or not cfg.calibration.path:
        check_suite(cfg.eval, positions, bool(cfg.data.path), tokenizer if cfg.eval_change else None)
    if not cfg.calibration.path:
        retrieval.check_fit(cfg.eval.retrieval, tokenizer, calibration_cells(cfg.eval.retrieval))
    device = resolve_device(cfg.get("device"))
    model, _ = loading.load_model(cfg.model, cfg.get("backend"), device)
    types_before = list(model.config.l2a_layer_types)
    if tokenizer is not None:
        loading.check_tokenizer(tokenizer, model)
    dataset = open_data(cfg.data.path, model, positions) if cfg.data.path and cfg.eval_change else None

    fractions, calibration_data = calibrate(model, tokenizer, cfg, device)
    ranking, chosen, rule = choose(fractions, types_before, threshold, k)
    if not chosen:  # writing an unpruned copy as "pruned" would hide that the rule matched nothing
        sparsest = ranking[0]
        raise UserError(
            f"threshold={threshold}: no L2A layer routes fewer than that fraction of its tokens on the calibration "
            f"set (the sparsest, layer {sparsest['layer']}, routes {sparsest['routed_fraction']:.4f}), so nothing "
            f"would be pruned; raise threshold above {sparsest['routed_fraction']:.4f} or set k=<number of layers>"
        )
    log.info("routed fractions: %s; pruning %s (%s)", [round(x, 4) for x in fractions], chosen, rule)
    kv_before = kv_report(model.config, int(cfg.kv_length))
    suite_args = (tokenizer, dataset, cfg.eval, device, int(cfg.data.max_rows), False)
    before = run_suite(model, *suite_args) if cfg.eval_change else None
    prune_layers(model, chosen)
    after = run_suite(model, *suite_args) if cfg.eval_change else None
    kv_after = kv_report(model.config, int(cfg.kv_length))

    rep = {
        "source": str(cfg.model.path),
        "output": str(output),
        "calibration": {"data": calibration_data, "routed_fraction": fractions, "ranking": ranking},
        "rule": rule,
        "pruned_layers": chosen,
        "layer_types_before": types_before,
        "layer_types_after": list(model.config.l2a_layer_types),
        "kv_cache": {
            "length": int(cfg.kv_length),
            "full_attention": kv_before["kv_cache_bytes_full"],
            "before": kv_before["kv_cache_bytes"],
            "after": kv_after["kv_cache_bytes"],
            "before_vs_full": kv_before["kv_cache_vs_full"],
            "after_vs_full": kv_after["kv_cache_vs_full"],
            "after_vs_before": kv_after["kv_cache_bytes"] / kv_before["kv_cache_bytes"],
        },
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    if cfg.eval_change:
        rep["eval"] = {"before": before, "after": after, "change": eval_change(before, after)}
    rep["elapsed_s"] = round(time.time() - start, 1)

    def write(tmp: Path) -> None:
        model.save_pretrained(str(tmp), safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        (tmp / "prune_report.json").write_text(json.dumps(rep, indent=2) + "\n")
        (tmp / "prune_report.md").write_text(markdown(rep))

    write_atomically(output, bool(cfg.overwrite), write)
    log.info("wrote %s\n%s", output, markdown(rep))
    return rep

