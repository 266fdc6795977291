"""The evaluation suite behind `l2a-eval` and `l2a-prune`:

- `perplexity`: perplexity by position bucket on held-out packed data;
- `retrieval`: RULER-style synthetic retrieval over lengths x needle depths;
- `router`: routed fraction per layer vs context length and token position, and whether routed
  tokens concentrate at needle and question tokens;
- `report`: Markdown tables and PNG plots; `loading`: any checkpoint, its tokenizer, device.
"""

from __future__ import annotations

import copy
import logging

from l2a_common import UserError

from . import loading, perplexity, report, retrieval
from .router import RouterProbe

log = logging.getLogger("l2a-eval")


def kv_report(config, length: int) -> dict:
    """Analytic KV-cache bytes at `length` tokens (bf16, batch 1), and against full attention."""
    from l2a_train.model import kv_cache_bytes

    full = copy.copy(config)
    full.l2a_layer_types = ["global"] * len(config.l2a_layer_types)
    ours, base = kv_cache_bytes(config, length), kv_cache_bytes(full, length)
    return {"kv_length": int(length), "kv_cache_bytes": int(ours), "kv_cache_bytes_full": int(base), "kv_cache_vs_full": ours / base}


def check_kv_length(kv_length) -> None:
    """The setting `kv_length` (l2a-eval, l2a-prune): the context length of the KV-cache figure."""
    if int(kv_length) < 1:
        raise UserError(f"kv_length={kv_length}: must be a positive number of tokens")


def model_summary(model, path, source: str, kv_length: int) -> dict:
    c = model.config
    return {
        "path": str(path),
        "model_type": c.model_type,
        "source": source,
        "layer_types": list(c.l2a_layer_types),
        "window": int(c.l2a_window),
        "routing": c.l2a_routing,
        "max_positions": loading.max_positions(model),
        "dtype": str(model.dtype).replace("torch.", ""),
        **kv_report(c, kv_length),
    }


def check_suite(suite, max_positions: int, has_data: bool, tokenizer=None) -> None:
    """Every setting of the suite, before any model work; with the tokenizer, also that every
    retrieval length holds its task's prompt (that depends on the tokenizer)."""
    if suite.retrieval.enabled:
        retrieval.tasks_of(suite.retrieval)
        retrieval.check_lengths(suite.retrieval, max_positions)
        if tokenizer is not None:
            retrieval.check_fit(suite.retrieval, tokenizer, retrieval.prompt_cells(suite.retrieval))
    if suite.perplexity.enabled and has_data:
        perplexity.check_edges(suite.perplexity.buckets)


def open_data(path, model, max_positions: int):
    from l2a_train.data import PackedDataset

    dataset = PackedDataset(path)
    perplexity.check_data(dataset, model.config, max_positions)
    return dataset


def run_suite(model, tokenizer, dataset, suite, device, max_rows: int, analyse_router: bool = True) -> dict:
    """Perplexity (if `dataset`), retrieval (if enabled), router analysis (if asked and L2A)."""
    max_pos = loading.max_positions(model)
    probe = RouterProbe(model) if analyse_router else None
    results: dict = {}
    try:
        if dataset is not None and suite.perplexity.enabled:
            results["perplexity"] = perplexity.run(model, dataset, suite.perplexity, device, max_rows, probe=probe, log=log)
        if suite.retrieval.enabled:
            if tokenizer is None:
                raise UserError("the retrieval suite needs a tokenizer: pass tokenizer=<dir>")
            results["retrieval"] = retrieval.run(model, tokenizer, suite.retrieval, device, max_pos, probe=probe, log=log)
    finally:
        if probe is not None:
            probe.close()
    if probe is not None:
        summary = probe.summary()
        if summary is not None:
            results["router"] = summary
        else:
            results["router_note"] = "random routing: decisions do not depend on the tokens, not analysed"
    return results


__all__ = ["RouterProbe", "check_suite", "kv_report", "loading", "model_summary", "open_data", "perplexity",
           "report", "retrieval", "run_suite"]
