"""l2a-prune end to end on tiny checkpoints: ranking, threshold / k rules, a pruned checkpoint
that loads and generates without global KV for pruned layers, the report, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import l2a_train  # noqa: F401  (registers the Auto classes)
from l2a_common import UserError, compose
from l2a_train.model import kv_cache_bytes
from l2a_train.model.cache import L2ACache
from l2a_train.prune_checkpoint import choose, prune
from test_eval import SUITE, build_workspace

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    torch.set_num_threads(1)
    return build_workspace(tmp_path_factory.mktemp("prune-ws"))


def run_prune(ws, out, *overrides, model="l2a"):
    cfg = compose("prune", [f"model.path={ws[model]}", f"output={out}", *SUITE, *overrides])
    return prune(cfg)


def test_prune_by_threshold_writes_a_checkpoint_that_loads_and_generates(ws, tmp_path):
    out = tmp_path / "pruned"
    rep = run_prune(ws, out, f"calibration.path={ws['data']}", f"data.path={ws['data']}", "threshold=0.3")
    assert rep["pruned_layers"] == [2]  # the fixture's sparse layer
    ranking = rep["calibration"]["ranking"]
    assert ranking[0]["layer"] == 2 and ranking[0]["routed_fraction"] < 0.3 <= ranking[1]["routed_fraction"]
    assert [r["routed_fraction"] for r in ranking] == sorted(r["routed_fraction"] for r in ranking)
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json",
                                                "prune_report.json", "prune_report.md"}
    assert json.loads((out / "prune_report.json").read_text())["pruned_layers"] == [2]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers

    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.config.l2a_layer_types == ["l2a", "l2a", "swa", "l2a"]
    assert not hasattr(model.model.layers[2], "global_attn")
    ids = torch.randint(0, 512, (1, 80), generator=torch.Generator().manual_seed(0))
    seqs = model.generate(ids, max_new_tokens=5, min_new_tokens=5, do_sample=False, use_cache=True,
                          return_dict_in_generate=True)
    cache = seqs.get("cache", seqs.get("past_key_values"))
    assert isinstance(cache, L2ACache) and cache.layers[2].full is None and cache.layers[2].local[0].shape[1] == 64
    assert all(cache.layers[i].full[0].shape[1] == 84 for i in (0, 1, 3))

    kv = rep["kv_cache"]
    assert kv["before"] == kv_cache_bytes(AutoModelForCausalLM.from_pretrained(ws["l2a"]).config, 131072)
    assert kv["after"] == kv_cache_bytes(model.config, 131072) < kv["before"]
    assert kv["after_vs_full"] == pytest.approx((3 * (131072 + 64) + 64) / (4 * 131072))
    change = rep["eval"]["change"]
    assert list(change["retrieval"]["tasks"]) == ["single_needle", "multi_key", "multi_value", "multi_query"]
    assert [r["bucket"] for r in change["perplexity"]] == ["0-128", "128-512", "all"]
    md = (out / "prune_report.md").read_text()
    assert "| after pruning |" in md and "| 2 | " in md and "Perplexity:" in md


def test_prune_k_sparsest_with_synthetic_calibration(ws, tmp_path):
    rep = run_prune(ws, tmp_path / "k2", "k=2", "eval_change=false")
    ranked = [r["layer"] for r in rep["calibration"]["ranking"]]
    assert rep["pruned_layers"] == sorted(ranked[:2]) and 2 in rep["pruned_layers"]
    assert "synthetic retrieval prompts" in rep["calibration"]["data"] and "eval" not in rep
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "k2")
    assert loaded.config.l2a_layer_types.count("swa") == 2


def test_choose_rules():
    fractions = [0.5, 0.01, 0.2, 0.02, 1.0]
    types = ["l2a", "l2a", "l2a", "global", "l2a"]
    ranking, chosen, _ = choose(fractions, types, 0.3, None)
    assert [r["layer"] for r in ranking] == [1, 2, 0, 4] and chosen == [1, 2]  # the global layer is no candidate
    assert choose(fractions, types, 0.0, None)[1] == []
    assert choose(fractions, types, 1.0, None)[1] == [0, 1, 2]  # 1.0 is not < 1.0
    assert choose(fractions, types, 0.3, 3)[1] == [0, 1, 2]
    with pytest.raises(UserError, match="only 4 L2A layers"):
        choose(fractions, types, 0.3, 5)


@pytest.mark.parametrize(
    "overrides, model, message",
    [
        ([], "base", "not an L2A checkpoint"),
        (["threshold=1.5"], "l2a", r"threshold=1.5: must be in \[0, 1\]"),
        (["threshold=-0.1"], "l2a", r"must be in \[0, 1\]"),
        (["threshold=abc"], "l2a", "give a routed fraction"),
        (["k=-1"], "l2a", "k=-1"),
        (["k=0"], "l2a", r"k=0 prunes no layer: give the number of sparsest L2A layers to prune \(k >= 1\)"),
        (["threshold=0"], "l2a", r"threshold=0 prunes no layer .* give a threshold in \(0, 1\], e.g. threshold=0.05"),
        (["threshold=0.0"], "l2a", "threshold=0 prunes no layer"),
        (["k=9"], "l2a", "only 4 L2A layers"),
        (["eval.retrieval.lengths=[8192]"], "l2a", "exceeds the model's 4096 positions"),
        (["model.max_position_embeddings=128"], "l2a", "exceeds the model's 128 positions"),
    ],
)
def test_bad_input_is_one_clear_error_and_nothing_is_written(ws, tmp_path, overrides, model, message):
    with pytest.raises(UserError, match=message):
        run_prune(ws, tmp_path / "out", "eval_change=false", *overrides, model=model)
    assert not list(tmp_path.iterdir())


def test_a_model_without_l2a_layers_and_an_existing_output_are_refused(ws, tmp_path):
    from l2a_train.model import build_base, convert_model

    cfg = compose("convert", ["model=tiny_qwen3", "output=unused", "l2a=swa", "l2a.window=64"])
    convert_model(build_base(cfg.model), cfg.l2a, cfg.model).save_pretrained(tmp_path / "swa")
    with pytest.raises(UserError, match="no L2A layers"):
        prune(compose("prune", [f"model.path={tmp_path / 'swa'}", f"output={tmp_path / 'o'}", *SUITE]))
    (tmp_path / "exists").mkdir()
    with pytest.raises(UserError, match="already exists"):
        run_prune(ws, tmp_path / "exists")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists", "swa"]


def test_a_threshold_under_every_layer_is_refused_instead_of_writing_an_unpruned_copy(ws, tmp_path):
    """A freshly converted model routes every token (router at zero: p = 0.5 >= 0.5): no routed
    fraction is below 1.0, so threshold=1.0 would prune nothing."""
    from transformers import AutoTokenizer

    from l2a_train.model import build_base, convert_model

    cfg = compose("convert", ["model=tiny_qwen3", "output=unused", "l2a.window=64"])
    convert_model(build_base(cfg.model), cfg.l2a, cfg.model).save_pretrained(tmp_path / "fresh")
    AutoTokenizer.from_pretrained(ws["tokenizer"]).save_pretrained(tmp_path / "fresh")
    with pytest.raises(UserError, match=r"threshold=1.0: no L2A layer routes fewer than that fraction .* routes 1.0000\), "
                                        r"so nothing would be pruned; raise threshold above 1.0000 or set k="):
        prune(compose("prune", [f"model.path={tmp_path / 'fresh'}", f"calibration.path={ws['data']}", "threshold=1.0",
                                f"output={tmp_path / 'out'}", *SUITE]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh"]
