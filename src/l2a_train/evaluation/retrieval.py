"""RULER-style synthetic retrieval (single needle, multi-key, multi-value, multi-query) over
context lengths and needle depths, scored on the model's greedy continuation.

Samples come from `l2a_data_prep.synthetic.generate` (the generator the training data uses),
with lengths counted in the evaluated tokenizer's tokens: the haystack is sized by the token
count of the whole tokenized prompt, searched for (`fitted_prompt`), so every length fits with
any tokenizer, whatever its characters per token. That generator scatters needles at
random depths; for the depth x length grid the queried needles are then moved, together, to
the sentence boundary nearest the requested depth of the haystack (0: right after the
introduction, 1: right before the question); distractor needles stay where they were drawn.

Score of a sample (RULER's string_match_all): the fraction of expected values that appear in
the generated text. A context length counts the prompt and `max_new_tokens`, as in RULER.
Every prompt is one document, generated alone (no padding), with the
model's KV cache. Decoding stops early once every expected value is in the continuation
(`AnswersFound`): the score of a longer greedy continuation could only be the same (it extends
the shorter one, and a value found stays found), so the early stop changes no score and saves
the decode steps of every correct answer.
"""

from __future__ import annotations

import functools
import random
import re
import time
from dataclasses import dataclass

import numpy as np
import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from l2a_common import UserError

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


FIT_STEPS = 16  # measured prompts per fit at most; 2-4 in practice


def prompt_tokens(tokenizer, text: str) -> int:
    """Tokens of a prompt as the model gets it (`run` feeds `tokenizer(text)`: BOS included if any)."""
    return len(tokenizer(text)["input_ids"])


def sentence_tokens(spec: dict, count) -> int:
    """Tokens of the longest haystack sentence (of 64 drawn with a fixed seed): the step by which
    the generator grows a haystack, so the closest a fitted prompt can come to its budget."""
    sentence = synthetic().haystack_sentences(random.Random(0), spec["haystack"])
    return max(count(" " + sentence()) for _ in range(64))


def no_room(setting: str, lengths: list[int], name: str, spec: dict, length: int, needed: int,
            max_new_tokens: int) -> UserError:
    needles = spec["num_keys"] * spec["num_values"]
    return UserError(
        f"{setting}.lengths={lengths}: {length} tokens cannot hold a {name} prompt with this tokenizer: its "
        f"introduction, {needles} needle{'s' if needles > 1 else ''} and question alone take {needed} tokens, plus "
        f"max_new_tokens={max_new_tokens} for the answer; use lengths of at least {needed + max_new_tokens} "
        "(several times that leaves room for a haystack), or a smaller max_new_tokens"
    )


def bare_prompt(seed: str, spec: dict, depth: float, count) -> Prompt:
    """The sample of `seed` without haystack (requested size 0): the shortest prompt it can give."""
    return make_prompt(random.Random(seed), spec, 0, depth, count)


def fitted_prompt(seed: str, spec: dict, budget: int, depth: float, tokenizer, count) -> Prompt:
    """`make_prompt` with the largest haystack whose tokenized prompt has at most `budget` tokens.

    The generator adds whole haystack sentences, counted one at a time, so the real token count
    of the prompt is a step function of the requested size, off by up to a sentence plus the
    tokenizer's merges across joins, differently for every tokenizer (shrinking the request by
    the excess, as before, crawled a token at a time inside one step and gave up). So search on
    measured counts: keep the largest request known to fit and the smallest known to overshoot;
    move by the measured shortfall, or by the excess plus a sentence; bisect when that would
    leave the bracket; stop within one haystack sentence of the budget or when the bracket
    closes. Deterministic: a function of (seed, spec, budget, depth) and the tokenizer.
    """
    best = bare_prompt(seed, spec, depth, count)
    best_n = prompt_tokens(tokenizer, best.text)
    if best_n > budget:  # `check_fit` says so, with the setting to change, before any model work
        raise UserError(f"{budget} tokens cannot hold the retrieval prompt {seed}: without haystack it has "
                        f"{best_n} tokens with this tokenizer; use longer lengths")
    close_enough = sentence_tokens(spec, count)
    fits, overshoots = 0, None  # requested sizes: the largest known to fit, the smallest known to overshoot
    request = budget
    for _ in range(FIT_STEPS):
        if budget - best_n <= close_enough or (overshoots is not None and overshoots - fits <= 1):
            break
        prompt = make_prompt(random.Random(seed), spec, request, depth, count)
        n = prompt_tokens(tokenizer, prompt.text)
        if n <= budget:
            fits, guess = request, request + (budget - n)
            if n > best_n:
                best, best_n = prompt, n
        else:
            # the excess alone can stay inside one sentence step and crawl down a token at a time
            overshoots, guess = request, request - (n - budget) - close_enough
        if fits < guess < (overshoots if overshoots is not None else guess + 1):
            request = guess
        elif overshoots is not None:
            request = (fits + overshoots) // 2
        else:  # the prompt has exactly `budget` tokens
            break
    return best


def check_fit(cfg, tokenizer, cells, setting: str = "eval.retrieval") -> None:
    """Every prompt of `cells` ((name, spec, length, depth, seed) tuples) fits its length: the
    bare prompt (no haystack) plus max_new_tokens, with this tokenizer. Cheap (short prompts):
    run before the model loads, so a length too short for a task is one line, not a crash
    after perplexity and half of the retrieval grid."""
    count = token_counter(tokenizer)
    max_new = int(cfg.max_new_tokens)
    for name, spec, length, depth, seed in cells:
        needed = prompt_tokens(tokenizer, bare_prompt(seed, spec, depth, count).text)
        if needed + max_new > length:
            raise no_room(setting, [int(x) for x in cfg.lengths], name, spec, length, needed, max_new)


def prompt_seed(cfg, name: str, length: int, depth: float, index: int) -> str:
    """The prompts are a function of (seed, task, length, depth, index): the same for every checkpoint."""
    return f"{cfg.seed}:{name}:{length}:{depth}:{index}"


def prompt_cells(cfg):
    """(task name, spec, length, depth, seed) of every prompt of the suite."""
    for name, spec in tasks_of(cfg).items():
        for length in [int(x) for x in cfg.lengths]:
            for depth in [float(d) for d in cfg.depths]:
                for i in range(int(cfg.samples)):
                    yield name, spec, length, depth, prompt_seed(cfg, name, length, depth, i)


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


class AnswersFound(StoppingCriteria):
    """Stops greedy decoding of one prompt (batch 1) once `score` of the continuation is 1."""

    def __init__(self, tokenizer, prompt_len: int, answers: list[str]):
        self.tokenizer, self.prompt_len, self.answers = tokenizer, prompt_len, answers

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        text = self.tokenizer.decode(input_ids[0, self.prompt_len :].tolist(), skip_special_tokens=True)
        done = score(text, self.answers) == 1.0
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


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
    check_fit(cfg, tokenizer, prompt_cells(cfg))
    count = token_counter(tokenizer)
    max_new = int(cfg.max_new_tokens)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    results: dict = {"tasks": {}, "lengths": [int(x) for x in cfg.lengths], "depths": [float(d) for d in cfg.depths]}
    start = time.time()
    for name, spec in tasks.items():
        cells = []
        for length in results["lengths"]:
            for depth in results["depths"]:
                scores, tokens, depths = [], [], []
                for i in range(int(cfg.samples)):
                    seed = prompt_seed(cfg, name, length, depth, i)
                    prompt = fitted_prompt(seed, spec, length - max_new, depth, tokenizer, count)
                    ids, regions = token_regions(tokenizer, prompt)
                    input_ids = torch.tensor([ids], device=device)
                    if probe is not None:
                        probe.start()
                    out = model.generate(
                        input_ids, max_new_tokens=max_new, do_sample=False, use_cache=True,
                        pad_token_id=pad, attention_mask=torch.ones_like(input_ids),
                        stopping_criteria=StoppingCriteriaList([AnswersFound(tokenizer, len(ids), prompt.answers)]),
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
