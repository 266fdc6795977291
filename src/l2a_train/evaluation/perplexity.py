"""Perplexity by position bucket on held-out packed data (`l2a_train.data.PackedDataset`).

A token is counted in the bucket of its position inside its document (its context length):
with edges [0, 4096, 32768, ...] the first bucket holds the predictions of tokens 1..4095 of
every document. The first token of a document is never predicted (its context is another
document). Rows run whole, with their document boundaries, like in training; logits are made
a chunk of positions at a time, so [tokens x vocab] never exists at once.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from l2a_common import UserError


def label(n: int) -> str:
    return f"{n // 1024}K" if n and n % 1024 == 0 else str(n)


def bucket_names(edges: list[int]) -> list[str]:
    return [f"{label(lo)}-{label(hi)}" for lo, hi in zip(edges[:-1], edges[1:])]


def check_edges(edges) -> list[int]:
    edges = [int(e) for e in edges]
    if len(edges) < 2 or edges[0] < 0 or any(b <= a for a, b in zip(edges[:-1], edges[1:])):
        raise UserError(f"eval.perplexity.buckets={edges}: give increasing position edges, e.g. [0, 4096, 32768]")
    return edges


def check_data(dataset, model_config, max_positions: int) -> None:
    if dataset.seq_len > max_positions:
        raise UserError(
            f"data.path={dataset.root}: rows of {dataset.seq_len} tokens exceed the model's {max_positions} positions "
            "(max_position_embeddings); use shorter held-out rows or extend the context (model.max_position_embeddings)"
        )
    vocab = dataset.manifest.get("tokenizer", {}).get("vocab_size")
    if vocab is not None and int(vocab) > int(model_config.vocab_size):
        raise UserError(
            f"data.path={dataset.root} was tokenized with {vocab} tokens, the model has {model_config.vocab_size}: "
            "prepare the held-out data with the model's tokenizer"
        )


@torch.no_grad()
def run(model, dataset, cfg, device, max_rows: int, probe=None, chunk: int = 2048, log=None) -> dict:
    from l2a_train.data import position_ids

    edges = check_edges(cfg.buckets)
    rows = min(int(max_rows), dataset.num_rows)
    nll = np.zeros(len(edges) - 1)
    count = np.zeros(len(edges) - 1, dtype=np.int64)
    start = time.time()
    for row in range(rows):
        tokens, starts = dataset.row(row)
        pos = position_ids(starts, dataset.seq_len)
        ids = torch.from_numpy(tokens.astype(np.int64))[None].to(device)
        if probe is not None:
            probe.start()
        hidden = model.model(input_ids=ids, position_ids=torch.from_numpy(pos)[None].to(device)).last_hidden_state[0]
        if probe is not None:
            probe.finish_positions(pos, edges)
        target_pos = torch.from_numpy(pos[1:]).to(device)
        for lo in range(0, dataset.seq_len - 1, chunk):
            hi = min(lo + chunk, dataset.seq_len - 1)
            logits = model.lm_head(hidden[lo:hi]).float()
            losses = F.cross_entropy(logits, ids[0, lo + 1 : hi + 1], reduction="none")
            tp = target_pos[lo:hi]
            valid = tp > 0  # a 0 starts a new document: not predictable from the previous one
            for b, (blo, bhi) in enumerate(zip(edges[:-1], edges[1:])):
                mask = valid & (tp >= blo) & (tp < bhi)
                nll[b] += float(losses[mask].double().sum())
                count[b] += int(mask.sum())
        if log is not None:
            log.info("perplexity row %d/%d (%.0f s)", row + 1, rows, time.time() - start)
    buckets = []
    for name, (lo, hi), s, n in zip(bucket_names(edges), zip(edges[:-1], edges[1:]), nll, count):
        buckets.append(dict(bucket=name, lo=lo, hi=hi, tokens=int(n), nll=float(s / n) if n else None,
                            ppl=float(math.exp(s / n)) if n else None))
    total = int(count.sum())
    return {
        "rows": rows,
        "seq_len": dataset.seq_len,
        "buckets": buckets,
        "all": dict(tokens=total, nll=float(nll.sum() / total) if total else None,
                    ppl=float(math.exp(nll.sum() / total)) if total else None),
    }
