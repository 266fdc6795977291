"""Inference with the L2A KV cache through HF generate (tiny models, CPU, reference backend)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

import l2a_train  # noqa: F401  (registers the Auto classes)
from l2a_common import compose
from l2a_train.model import build_base, convert_model, kv_cache_bytes, prune_layers
from l2a_train.model import cache as cache_mod
from l2a_train.model.cache import L2ACache, cache_field_name

VOCAB = 4096
CACHE = cache_field_name()  # the cache keyword: `cache` (transformers 5.24) or `past_key_values` (5.17)


pytestmark = pytest.mark.usefixtures("single_thread")


def l2a_model(model="tiny_qwen3", *overrides, router_std=0.05, seed=0):
    """A converted tiny model; routers set at random so that some tokens are routed, some not."""
    cfg = compose("convert", [f"model={model}", "output=unused", *overrides])
    model = convert_model(build_base(cfg.model), cfg.l2a, cfg.model).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.model.layers:
            if hasattr(layer, "router"):
                layer.router.weight.copy_(torch.randn(layer.router.weight.shape, generator=gen) * router_std)
    return model


def prompt(batch=2, length=12, seed=0):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def greedy_without_cache(model, ids, steps):
    for _ in range(steps):
        nxt = model(ids).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], 1)
    return ids


def generate(model, ids, steps, **kwargs):
    out = model.generate(
        ids, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, use_cache=True,
        return_dict_in_generate=True, **kwargs,
    )
    cache = out.get(CACHE)
    return out.sequences, cache


@pytest.mark.parametrize("model_name", ["tiny_qwen3", "tiny_qwen2"])
def test_greedy_generation_with_cache_equals_full_forwards(model_name):
    # window 5 < 12 prompt + 14 generated tokens: the SWA caches must drop old positions
    model = l2a_model(model_name, "l2a.window=5", "l2a.layers=[1,2,3]")
    ids = prompt()
    seqs, cache = generate(model, ids, 14)
    torch.testing.assert_close(seqs, greedy_without_cache(model, ids, 14), rtol=0, atol=0)
    assert isinstance(cache, L2ACache) and cache.get_seq_length() == 12 + 13
    assert 0.0 < cache.skipped_fraction() < 1.0  # both routed and skipped decode tokens were exercised
    for layer in cache.layers[1:]:
        assert layer.local[0].shape[1] == 5 and layer.full[0].shape[1] == 25
    assert cache.layers[0].local is None and cache.layers[0].full[0].shape[1] == 25


def test_decode_and_multi_token_steps_match_full_forward_logits(monkeypatch):
    monkeypatch.setattr(cache_mod, "GROWTH", 2)  # the full caches' buffers grow several times
    model = l2a_model("tiny_qwen3", "l2a.window=4", "l2a.layers=[0,2]")
    ids = prompt(batch=2, length=20)
    with torch.no_grad():
        full = model(ids).logits
        cache = L2ACache(model.config)
        parts = [model(ids[:, :7], **{CACHE: cache}, use_cache=True).logits]
        parts.append(model(ids[:, 7:8], **{CACHE: cache}, use_cache=True).logits)  # decode
        parts.append(model(ids[:, 8:15], **{CACHE: cache}, use_cache=True).logits)  # chunk: masks
        for t in range(15, 20):
            parts.append(model(ids[:, t : t + 1], **{CACHE: cache}, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)


def test_unrouted_decode_steps_skip_global_attention(monkeypatch):
    model = l2a_model("tiny_qwen3", "l2a.window=4", router_std=0.0)  # every layer L2A
    model.config.l2a_threshold = 0.999  # p = 0.5 < threshold: no token is routed
    ids = prompt(batch=1)
    lengths = []
    real = cache_mod.attend_cached
    monkeypatch.setattr(cache_mod, "attend_cached", lambda q, k, *a, **kw: lengths.append(k.shape[1]) or real(q, k, *a, **kw))
    seqs, cache = generate(model, ids, 6)
    assert cache.skipped_fraction() == 1.0
    assert lengths and max(lengths) == 5  # after prefill only the sliding-window attention ran (4 cached + 1)
    # the skipped tokens' global K/V were appended all the same (12 prompt + 5 fed back)
    assert all(layer.full[0].shape[1] == 17 for layer in cache.layers)
    torch.testing.assert_close(seqs, greedy_without_cache(model, ids, 6), rtol=0, atol=0)


def test_full_attention_model_generates_like_the_base_model():
    cfg = compose("convert", ["model=tiny_qwen2", "output=unused", "l2a=full"])
    base = build_base(cfg.model).eval()
    model = convert_model(base, cfg.l2a, cfg.model).eval()
    ids = prompt()
    ours, cache = generate(model, ids, 8)
    theirs = base.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False, use_cache=True)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert all(layer.local is None for layer in cache.layers)


def test_pruned_model_generates_and_holds_no_global_kv_for_pruned_layers(tmp_path):
    model = l2a_model("tiny_qwen2", "l2a.window=6")
    prune_layers(model, [0, 2])
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.l2a_layer_types == ["swa", "l2a", "swa", "l2a"]
    assert not any("global_attn" in k for k in loaded.state_dict() if k.startswith(("model.layers.0.", "model.layers.2.")))
    ids = prompt()
    seqs, cache = generate(loaded, ids, 12)
    torch.testing.assert_close(seqs, greedy_without_cache(loaded, ids, 12), rtol=0, atol=0)
    length = cache.get_seq_length()
    for i in (0, 2):
        assert cache.layers[i].full is None and cache.layers[i].local[0].shape[1] == 6
    assert cache.nbytes()["total"] == kv_cache_bytes(loaded.config, length, batch=2, dtype=torch.float32)


def test_beam_search_reorders_the_cache():
    model = l2a_model("tiny_qwen3", "l2a.window=4", "l2a.layers=[1,3]")
    ids = prompt(batch=1)
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, num_beams=3, do_sample=False)
    cached = model.generate(ids, use_cache=True, **kwargs)
    plain = model.generate(ids, use_cache=False, **kwargs)
    torch.testing.assert_close(cached, plain, rtol=0, atol=0)


def test_bad_inputs_are_refused_clearly():
    model = l2a_model("tiny_qwen3", "l2a.window=4")
    ids = prompt()
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with pytest.raises(ValueError, match="padding"):
        model.generate(ids, attention_mask=mask, max_new_tokens=2)
    packed = torch.cat([torch.arange(6), torch.arange(6)]).expand(2, 12)
    with pytest.raises(ValueError, match="one document"):
        model(ids, position_ids=packed, use_cache=True)
    filled = DynamicCache()
    filled.update(torch.zeros(2, 2, 3, 32), torch.zeros(2, 2, 3, 32), 0)
    with pytest.raises(TypeError, match="L2ACache"):
        model(ids, **{CACHE: filled}, use_cache=True)
    cache = L2ACache(model.config)
    with torch.no_grad():
        model(ids, **{CACHE: cache}, use_cache=True)
    with pytest.raises(ValueError, match="rows"):
        model(ids[:1, :1], **{CACHE: cache}, use_cache=True)


def test_training_forward_makes_no_cache():
    model = l2a_model("tiny_qwen3", "l2a.window=4")
    out = model.model(input_ids=prompt())
    assert out.get(CACHE) is None


@pytest.mark.gpu
def test_cuda_prefill_with_kernels_then_decode_matches_no_cache():
    model = l2a_model("tiny_qwen3", "l2a.window=16", "l2a.layers=[1,3]").to("cuda", torch.bfloat16)
    ids = prompt(batch=1, length=64).cuda()
    with torch.no_grad():
        full = model(ids).logits.float()
        cache = L2ACache(model.config)
        pre = model(ids[:, :60], **{CACHE: cache}, use_cache=True).logits.float()
        steps = [model(ids[:, t : t + 1], **{CACHE: cache}, use_cache=True).logits.float() for t in range(60, 64)]
    torch.testing.assert_close(torch.cat([pre, *steps], 1), full, rtol=3e-2, atol=3e-2)
