"""What `l2a-generate` does: continue a prompt with any checkpoint, through the L2A KV cache.

    l2a-generate model.path=checkpoints/quickstart-pruned "prompt='def fibonacci(n):'"   # Hydra quoting
    l2a-generate model.path=/ckpt/qwen3-8b-l2a prompt=@/data/long_prompt.txt max_new_tokens=256

Prints the continuation, then one line: prompt and new tokens, time to first token, decode
tokens/s and the KV cache at the final length (SWA layers keep W positions, global ones all).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from l2a_common import UserError

from .devices import resolve_device
from .evaluation import kv_report, loading

log = logging.getLogger("l2a-generate")


class _Clock:
    """A `generate` streamer that only notes times: put() gets the prompt first, then each new
    token (transformers' streamer protocol), so the second call marks the first token."""

    def __init__(self):
        self.start = self.first = self.last = None

    def put(self, value):
        now = time.perf_counter()
        if self.start is None:
            self.start = now
        elif self.first is None:
            self.first = now
        self.last = now

    def end(self):
        self.last = time.perf_counter()


def read_prompt(prompt) -> str:
    text = str(prompt)
    if text.startswith("@"):
        path = Path(text[1:])
        if not path.is_file():
            raise UserError(f"prompt=@{path}: no such file")
        text = path.read_text(encoding="utf-8")
    if not text:
        raise UserError("prompt is empty: give the text to continue, or prompt=@file")
    return text


def generate(cfg) -> str:
    if int(cfg.max_new_tokens) < 1:
        raise UserError(f"max_new_tokens={cfg.max_new_tokens}: must be >= 1")
    text = read_prompt(cfg.prompt)
    device = resolve_device(cfg.get("device"))
    model, _ = loading.load_model(cfg.model, cfg.get("backend"), device)
    tokenizer = loading.load_tokenizer(cfg.tokenizer, cfg.model.path)
    loading.check_tokenizer(tokenizer, model)
    ids = torch.tensor([tokenizer(text, add_special_tokens=True)["input_ids"]], device=device)
    total = ids.shape[1] + int(cfg.max_new_tokens)
    if total > loading.max_positions(model):
        raise UserError(f"the prompt's {ids.shape[1]} tokens + max_new_tokens={cfg.max_new_tokens} exceed the "
                        f"model's {loading.max_positions(model)} positions; shorten the prompt or max_new_tokens")
    torch.manual_seed(int(cfg.seed))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sampling = dict(do_sample=True, temperature=float(cfg.temperature)) if cfg.do_sample else dict(do_sample=False)
    clock = _Clock()
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=int(cfg.max_new_tokens), use_cache=True, pad_token_id=pad,
                             attention_mask=torch.ones_like(ids), streamer=clock, **sampling)
    ttft, elapsed = clock.first - clock.start, clock.last - clock.start
    new = out[0, ids.shape[1]:]
    completion = tokenizer.decode(new.tolist(), skip_special_tokens=True)
    kv = kv_report(model.config, out.shape[1])
    print(completion, flush=True)
    log.info("%d prompt tokens, %d new tokens; time to first token %.3f s, %.1f tokens/s after it; KV cache %.1f MiB "
             "(%.1f%% of full attention)", ids.shape[1], len(new), ttft, (len(new) - 1) / max(elapsed - ttft, 1e-9),
             kv["kv_cache_bytes"] / 2**20, 100 * kv["kv_cache_vs_full"])
    return completion

