"""What `l2a-eval` does: long-context evaluation of any checkpoint (base Qwen, full-attention, L2A, pruned).

    l2a-eval model.path=checkpoints/quickstart-l2a data.path=data/quickstart output=results/eval
    l2a-eval eval=ruler model.path=/ckpt/qwen3-8b-l2a data.path=/data/heldout output=results/qwen3-8b-l2a

Runs the suite of `configs/eval/<name>.yaml` (see `l2a_train.evaluation`): perplexity by position
bucket on held-out packed data, RULER-style retrieval over lengths x needle depths, router
analysis. Writes `eval.json`, `eval.md`, `retrieval_heatmap.png` and `routed_fraction.png` to
`output`, through a temporary directory renamed at the end (a failed run leaves nothing).
Every setting is checked before the model runs: a bad one is one line and exit status 2.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from omegaconf import OmegaConf

from l2a_common import UserError

from ..atomic import write_atomically
from ..data import check_tokenizer_matches
from ..devices import resolve_device
from . import check_kv_length, check_suite, loading, model_summary, open_data, report, run_suite

log = logging.getLogger("l2a-eval")


def write_results(tmp: Path, results: dict, stem: str = "eval") -> None:
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    (tmp / f"{stem}.md").write_text(report.markdown(results))
    report.plots(results, tmp)


def evaluate(cfg) -> dict:
    start = time.time()
    output = Path(cfg.output)
    if output.exists() and not cfg.overwrite:  # fail before any heavy work
        raise UserError(f"output={output} already exists; choose another directory or pass overwrite=true")
    check_kv_length(cfg.kv_length)
    device = resolve_device(cfg.get("device"))
    positions = loading.configured_positions(cfg.model)
    check_tokenizer_matches(cfg.model.path, {"data.path": cfg.data.path}, bool(cfg.data.allow_tokenizer_mismatch))
    tokenizer = loading.load_tokenizer(cfg.tokenizer, cfg.model.path, cfg.data.path, required=bool(cfg.eval.retrieval.enabled))
    check_suite(cfg.eval, positions, bool(cfg.data.path), tokenizer)
    model, source = loading.load_model(cfg.model, cfg.get("backend"), device)
    max_pos = loading.max_positions(model)
    dataset = open_data(cfg.data.path, model, max_pos) if cfg.data.path and cfg.eval.perplexity.enabled else None
    if tokenizer is not None:
        loading.check_tokenizer(tokenizer, model)

    results = {"model": model_summary(model, cfg.model.path, source, int(cfg.kv_length))}
    results.update(run_suite(model, tokenizer, dataset, cfg.eval, device, int(cfg.data.max_rows), bool(cfg.router)))
    results["config"] = OmegaConf.to_container(cfg, resolve=True)
    results["elapsed_s"] = round(time.time() - start, 1)
    write_atomically(output, bool(cfg.overwrite), lambda tmp: write_results(tmp, results))
    log.info("wrote %s\n%s", output, report.markdown(results))
    return results

