"""RULER-style synthetic retrieval (single needle, multi-key, multi-value, multi-query) over
context lengths and needle depths, scored on the model's greedy continuation.

Samples come from `l2a_data_prep.synthetic.generate` (the generator the training data uses),
with lengths counted in the evaluated tokenizer's tokens. That generator scatters needles at
random depths; for the depth x length grid the queried needles are then moved, together, to
the sentence boundary nearest the requested depth of the haystack (0: right after the
introduction, 1: right before the question); distractor needles stay where they were drawn.

Score of a sample (RULER's string_match_all): the fraction of expected values that appear in
the generated text. A context length counts the prompt and `max_new_tokens`, as in RULER.
Every prompt is one document, generated alone (no padding), with the
model's KV cache.
"""

from __future__ import annotations

import functools
import random
import re
import time
from dataclasses import dataclass

import numpy as np
import torch

from l2a_configs import UserError

REGIONS = ("haystack", "needle", "distractor", "question")
NEEDLE_RE = re.compile(r"One of the special magic \w+ for \S+ is: \S+?\.(?=\s|$)")
TASK_KEYS = ("num_keys", "num_values", "num_queries", "key_type", "value_type", "haystack")


def synthetic():
    try:
        from l2a_data_prep import synthetic as module
    except ImportError as err:  # pragma: no cover - the data_prep package ships with this repo
        raise UserError(f"the retrieval suite needs l2a_data_prep.synthetic ({err}); reinstall the repository") from err
    return module


@dataclass
class Prompt:
    text: str
    answers: list[str]
    regions: np.ndarray  # int8 per character: index into REGIONS
    depth: float  # where the queried needles ended up, 0..1 of the haystack


def task_spec(name: str, spec, defaults) -> dict:
    merged = {**{k: defaults[k] for k in ("key_type", "value_type", "haystack") if k in defaults}, **dict(spec)}
    unknown = sorted(set(merged) - set(TASK_KEYS))
    missing = [k for k in TASK_KEYS if k not in merged]
    if unknown or missing:
        raise UserError(f"eval.retrieval.tasks.{name}: unknown settings {unknown} / missing {missing}; use {list(TASK_KEYS)}")
    for key in ("num_keys", "num_values", "num_queries"):
        merged[key] = int(merged[key])
    if not 1 <= merged["num_queries"] <= merged["num_keys"] or merged["num_values"] < 1:
        raise UserError(f"eval.retrieval.tasks.{name}: need 1 <= num_queries <= num_keys and num_values >= 1")
    kinds = synthetic().KINDS
    for key in ("key_type", "value_type"):
        if merged[key] not in kinds:
            raise UserError(f"eval.retrieval.tasks.{name}.{key}='{merged[key]}' is not one of {sorted(kinds)}")
    if merged["haystack"] not in ("noise", "words"):
        raise UserError(f"eval.retrieval.tasks.{name}.haystack='{merged['haystack']}': use noise or words")
    return merged


def tasks_of(cfg) -> dict[str, dict]:
    if not cfg.get("tasks"):
        raise UserError("eval.retrieval.tasks is empty: name at least one task (see configs/eval/)")
    return {name: task_spec(name, spec, cfg) for name, spec in cfg.tasks.items()}


def token_counter(tokenizer):
    @functools.lru_cache(maxsize=65536)
    def count(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False))

    return count


def make_prompt(rng: random.Random, spec: dict, length: int, depth: float, count) -> Prompt:
    """One sample of about `length` tokens with the queried needles at `depth`."""
    syn = synthetic()
    sample = syn.generate(rng, length, count=count, **spec)
    kind = syn.KINDS[spec["value_type"]]
    per_key = spec["num_values"]
    queried = [
        syn.NEEDLE.format(kind=kind, key=key, value=value)
        for i, key in enumerate(sample.keys)
        for value in sample.answers[i * per_key : (i + 1) * per_key]
    ]
    context = sample.context
    intro = syn.INTRO.format(kind=kind)
    for text in queried:
        where = context.find(" " + text)
        if where < 0:  # pragma: no cover - would mean the generator's format changed
            raise RuntimeError(f"needle {text!r} not found in the generated context")
        context = context[:where] + context[where + 1 + len(text) :]
    # sentence boundaries of the haystack: after the intro and after every ". "
    starts = [len(intro)] + [m.start() + 1 for m in re.finditer(r"\. ", context) if m.start() >= len(intro)]
    starts.append(len(context))
    starts = sorted(set(starts))
    target = len(intro) + depth * (len(context) - len(intro))
    at = min(starts, key=lambda s: abs(s - target))
    block = " " + " ".join(queried)
    context = context[:at] + block + context[at:]
    text = f"{context}\n{sample.question}"

    regions = np.zeros(len(text), dtype=np.int8)
    for m in NEEDLE_RE.finditer(context):
        regions[m.start() : m.end()] = REGIONS.index("distractor")
    regions[at + 1 : at + len(block)] = REGIONS.index("needle")
    regions[len(context) + 1 :] = REGIONS.index("question")
    span = max(1, len(context) - len(intro) - len(block))
    return Prompt(text=text, answers=list(sample.answers), regions=regions, depth=(at - len(intro)) / span)


def fitted_prompt(seed: str, spec: dict, length: int, depth: float, tokenizer, count) -> Prompt:
    """`make_prompt` whose tokenized prompt has at most `length` tokens (and close to it): the
    generator's count is per sentence and may overshoot by a sentence, so shrink the target by
    the excess and draw the same sample again."""
    target = length
    for _ in range(6):
        prompt = make_prompt(random.Random(seed), spec, target, depth, count)
        n = len(tokenizer(prompt.text)["input_ids"])
        if n <= length:
            return prompt
        target -= n - length + 1
    raise UserError(f"could not fit a retrieval prompt into {length} tokens (seed {seed}); use longer lengths")


def token_regions(tokenizer, prompt: Prompt) -> tuple[list[int], np.ndarray | None]:
    """Token ids of the prompt and each token's region (None if the tokenizer gives no offsets)."""
    try:
        enc = tokenizer(prompt.text, return_offsets_mapping=True)
    except (NotImplementedError, ValueError, TypeError):
        return tokenizer(prompt.text)["input_ids"], None
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    regions = np.zeros(len(ids), dtype=np.int8)
    for i, (start, end) in enumerate(offsets):
        if end > start:  # the last character: " One" belongs to the needle it starts, not to the space
            regions[i] = prompt.regions[min(end, len(prompt.regions)) - 1]
    return ids, regions


def score(prediction: str, answers: list[str]) -> float:
    text = prediction.lower()
    return sum(a.lower() in text for a in answers) / len(answers)


def check_lengths(cfg, max_positions: int, setting: str = "eval.retrieval") -> None:
    lengths = [int(x) for x in cfg.lengths]
    depths = [float(d) for d in cfg.depths]
    if not lengths or min(lengths) < 1:
        raise UserError(f"{setting}.lengths={lengths}: give positive context lengths in tokens")
    if not depths or not all(0.0 <= d <= 1.0 for d in depths):
        raise UserError(f"{setting}.depths={depths}: depths are fractions in [0, 1]")
    if int(cfg.samples) < 1 or int(cfg.max_new_tokens) < 1:
        raise UserError(f"{setting}: samples and max_new_tokens must be >= 1")
    if min(lengths) <= int(cfg.max_new_tokens) + 64:
        raise UserError(f"{setting}.lengths={lengths}: each length must exceed max_new_tokens + 64 (the prompt's room)")
    if max(lengths) > max_positions:
        raise UserError(
            f"{setting}.lengths: {max(lengths)} tokens exceeds the model's {max_positions} positions "
            "(max_position_embeddings); evaluate shorter lengths or extend the context "
            "(model.max_position_embeddings, model.rope_theta)"
        )


@torch.no_grad()
def run(model, tokenizer, cfg, device, max_positions: int, probe=None, log=None) -> dict:
    """Accuracy per (task, length, depth); with a `RouterProbe`, the routing of every prefill."""
    tasks = tasks_of(cfg)
    check_lengths(cfg, max_positions)
    count = token_counter(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    results: dict = {"tasks": {}, "lengths": [int(x) for x in cfg.lengths], "depths": [float(d) for d in cfg.depths]}
    start = time.time()
    for name, spec in tasks.items():
        cells = []
        for length in results["lengths"]:
            for depth in results["depths"]:
                scores, tokens, depths = [], [], []
                for i in range(int(cfg.samples)):
                    seed = f"{cfg.seed}:{name}:{length}:{depth}:{i}"
                    prompt = fitted_prompt(seed, spec, length - int(cfg.max_new_tokens), depth, tokenizer, count)
                    ids, regions = token_regions(tokenizer, prompt)
                    input_ids = torch.tensor([ids], device=device)
                    if probe is not None:
                        probe.start()
                    out = model.generate(
                        input_ids, max_new_tokens=int(cfg.max_new_tokens), do_sample=False, use_cache=True,
                        pad_token_id=pad, attention_mask=torch.ones_like(input_ids),
                    )
                    if probe is not None:
                        probe.finish(length, len(ids), regions)
                    text = tokenizer.decode(out[0, len(ids) :].tolist(), skip_special_tokens=True)
                    scores.append(score(text, prompt.answers))
                    tokens.append(len(ids))
                    depths.append(prompt.depth)
                cells.append(
                    dict(length=length, depth=depth, accuracy=float(np.mean(scores)), samples=len(scores),
                         mean_tokens=float(np.mean(tokens)), placed_depth=float(np.mean(depths)))
                )
                if log is not None:
                    log.info("retrieval %s length %d depth %.2f: accuracy %.3f (%.0f s)", name, length, depth,
                             cells[-1]["accuracy"], time.time() - start)
        results["tasks"][name] = {
            "settings": spec,
            "cells": cells,
            "accuracy": float(np.mean([c["accuracy"] for c in cells])),
            "by_length": {str(L): float(np.mean([c["accuracy"] for c in cells if c["length"] == L])) for L in results["lengths"]},
        }
    results["accuracy"] = float(np.mean([t["accuracy"] for t in results["tasks"].values()]))
    return results
