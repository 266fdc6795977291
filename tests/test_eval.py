"""l2a-eval end to end on tiny checkpoints (base Qwen, L2A, pruned) with a locally trained
tokenizer and packed held-out data made by l2a-prep; scoring, needle placement, router probe,
bad input."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from transformers import AutoTokenizer

import l2a_train  # noqa: F401  (registers the Auto classes)
from l2a_common import UserError, compose
from l2a_data_prep import synthetic, tokenizer
from l2a_data_prep.pipeline import prepare
from l2a_train.data import PackedDataset, position_ids
from l2a_train.evaluation.evaluate import evaluate
from l2a_train.evaluation import RouterProbe, perplexity, retrieval
from l2a_train.model import build_base, convert_model, prune_layers

SEQ_LEN = 512
# a suite small enough for CPU: 4 tasks x 1 length x 2 depths x 1 sample, 6 new tokens
SUITE = [
    "eval.retrieval.lengths=[256]",
    "eval.retrieval.depths=[0.0,1.0]",
    "eval.retrieval.samples=1",
    "eval.retrieval.max_new_tokens=6",
    "eval.perplexity.buckets=[0,128,512]",
    "data.max_rows=2",
    "device=cpu",
]


pytestmark = pytest.mark.usefixtures("single_thread")


def build_workspace(root: Path) -> dict[str, Path]:
    """A trained tokenizer, held-out packed data, and base / L2A / pruned tiny checkpoints."""
    rng = random.Random(0)
    texts = [
        synthetic.generate(rng, 3000, num_keys=3, num_values=2, num_queries=2, key_type=k, value_type=v, haystack=h).document()
        for k in ("words", "numbers") for v in ("numbers", "words") for h in ("noise", "words") for _ in range(2)
    ]
    tok_dir = tokenizer.train_builtin(texts, 512, str(root / "tokenizers"))
    cfg = OmegaConf.to_container(compose("prep", [f"output={root / 'data'}"]), resolve=True)
    cfg.update(sources={"retrieval": {"type": "retrieval", "num_docs": 24, "length": [600, 2400]}},
               mixture=[], max_tokens=None, progress=False, seq_len=SEQ_LEN)
    cfg["tokenizer"]["path"] = tok_dir
    cfg["tokenizer"]["estimate_chars"] = 20000
    prepare(cfg)
    tok = AutoTokenizer.from_pretrained(tok_dir)

    conv = compose("convert", ["model=tiny_qwen3", "output=unused", "l2a.window=64"])
    l2a = convert_model(build_base(conv.model), conv.l2a, conv.model).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # routers of a "trained" model: some layers sparse, some dense
        for layer, scale in zip(l2a.model.layers, (0.02, 0.02, 0.005, 0.02)):
            layer.router.weight.copy_(torch.randn(layer.router.weight.shape, generator=gen) * scale)
            if scale < 0.01:
                layer.router.weight.sub_(0.05)
    paths = {"root": root, "data": root / "data", "tokenizer": Path(tok_dir)}
    for name, model in (("l2a", l2a), ("base", build_base(compose("convert", ["model=tiny_qwen2", "output=x"]).model))):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        paths[name] = root / name
    prune_layers(l2a, [2])
    l2a.save_pretrained(root / "pruned")
    tok.save_pretrained(root / "pruned")
    paths["pruned"] = root / "pruned"
    return paths


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    torch.set_num_threads(1)
    return build_workspace(tmp_path_factory.mktemp("eval-ws"))


def run_eval(ws, model: str, out: Path, *overrides):
    cfg = compose("eval", [f"model.path={ws[model]}", f"data.path={ws['data']}", f"output={out}", *SUITE, *overrides])
    return evaluate(cfg)


def md_table(md: str, heading: str) -> list[list[str]]:
    """The body rows of the first table after a heading line starting with `heading`."""
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(heading))
    rows = []
    for line in lines[start + 1 :]:
        if line.startswith("|"):
            rows.append([c.strip() for c in line.strip("|").split("|")])
        elif rows:
            break
    return rows[2:]  # header and separator


def test_eval_end_to_end_on_an_l2a_checkpoint(ws, tmp_path):
    out = tmp_path / "eval"
    results = run_eval(ws, "l2a", out)
    assert sorted(p.name for p in out.iterdir()) == ["eval.json", "eval.md", "retrieval_heatmap.png", "routed_fraction.png"]
    assert json.loads((out / "eval.json").read_text())["retrieval"]["tasks"].keys() == results["retrieval"]["tasks"].keys()
    md = (out / "eval.md").read_text()

    ppl = md_table(md, "## Perplexity")
    assert [r[0] for r in ppl] == ["0-128", "128-512", "all"]
    assert all(float(r[3]) > 1 for r in ppl)
    summary = md_table(md, "## Retrieval accuracy")
    assert [r[0] for r in summary] == ["single_needle", "multi_key", "multi_value", "multi_query", "mean"]
    assert len(summary[0]) == 3  # task, one length, all
    for task in ("single_needle", "multi_key", "multi_value", "multi_query"):
        assert [r[0] for r in md_table(md, f"### {task}")] == ["0.00", "1.00"]
    router = md_table(md, "## Routed fraction")
    assert [r[:2] for r in router] == [[str(i), "l2a"] for i in range(4)]

    r = results["router"]
    assert list(r["by_length"]) == ["256"] and list(r["by_position"]) == ["0-128", "128-512"]
    assert r["region_tokens"]["needle"] > 0 and r["region_tokens"]["question"] > 0
    assert r["by_length"]["256"][2] < 0.3 < r["by_length"]["256"][0]  # the sparse layer shows up as sparse
    cells = results["retrieval"]["tasks"]["single_needle"]["cells"]
    assert [(c["length"], c["depth"]) for c in cells] == [(256, 0.0), (256, 1.0)]
    assert all(220 <= c["mean_tokens"] <= 256 - 6 for c in cells), cells
    assert results["model"]["kv_cache_vs_full"] > 1.0  # every layer L2A: global + window caches


@pytest.mark.parametrize("model, types", [("base", ["global"] * 4), ("pruned", ["l2a", "l2a", "swa", "l2a"])])
def test_eval_runs_on_base_and_pruned_checkpoints(ws, tmp_path, model, types):
    results = run_eval(ws, model, tmp_path / "out", *[f"~eval.retrieval.tasks.{t}" for t in ("multi_key", "multi_value", "multi_query")])
    assert results["model"]["layer_types"] == types
    assert list(results["retrieval"]["tasks"]) == ["single_needle"]
    fractions = results["router"]["by_length"]["256"]
    for kind, fraction in zip(types, fractions):
        assert fraction == {"global": 1.0, "swa": 0.0}.get(kind, fraction)
    if model == "pruned":
        assert results["model"]["kv_cache_vs_full"] < 0.8


def test_perplexity_buckets_add_up_to_the_direct_loss(ws):
    from l2a_train.evaluation.loading import load_model

    model, _ = load_model(OmegaConf.create({"path": str(ws["l2a"])}))
    dataset = PackedDataset(ws["data"])
    cfg = OmegaConf.create({"buckets": [0, 100, 300, 512]})
    res = perplexity.run(model, dataset, cfg, torch.device("cpu"), max_rows=2)
    nll, count = 0.0, 0
    with torch.no_grad():
        for row in range(2):
            ids, starts = dataset.row(row)
            pos = torch.from_numpy(position_ids(starts, SEQ_LEN))
            ids = torch.from_numpy(ids.astype(np.int64))
            logits = model(ids[None], position_ids=pos[None]).logits[0, :-1]
            keep = pos[1:] > 0  # the first token of a document is not predicted from another
            nll += F.cross_entropy(logits[keep], ids[1:][keep], reduction="sum").item()
            count += int(keep.sum())
    assert res["all"]["tokens"] == count == sum(b["tokens"] for b in res["buckets"])
    assert res["all"]["nll"] == pytest.approx(nll / count, rel=1e-5)


def oracle_generate(tok):
    """A 'model' that reads the prompt and answers perfectly: checks prompts and scoring."""

    class Oracle:
        def generate(self, input_ids, max_new_tokens, **kwargs):
            text = tok.decode(input_ids[0].tolist())
            keys = re.search(r"special magic \w+ for (.+?) mentioned", text.splitlines()[-1]).group(1).split(", ")
            values = [v for k in keys for v in re.findall(rf"for {re.escape(k)} is: (\S+?)\.(?=\s|$)", text)]
            answer = tok(" " + ", ".join(values) + ".", add_special_tokens=False)["input_ids"]
            return torch.cat([input_ids, torch.tensor([answer])], 1)

    return Oracle()


def test_retrieval_prompts_and_scoring_with_a_perfect_reader(ws):
    tok = AutoTokenizer.from_pretrained(ws["tokenizer"])
    cfg = compose("eval", ["model.path=x", "output=x", "eval.retrieval.lengths=[400]", "eval.retrieval.depths=[0.0,0.5,1.0]",
                           "eval.retrieval.samples=2", "eval.retrieval.max_new_tokens=64"]).eval.retrieval
    res = retrieval.run(oracle_generate(tok), tok, cfg, torch.device("cpu"), max_positions=4096)
    assert res["accuracy"] == 1.0
    for task in res["tasks"].values():
        placed = [c["placed_depth"] for c in task["cells"]]
        assert placed[0] == 0.0 and placed[2] == 1.0 and 0.2 < placed[1] < 0.8
    assert retrieval.score("the numbers are 123 and 456.", ["123", "456", "789"]) == pytest.approx(2 / 3)


def test_decoding_stops_once_every_answer_is_in_the_continuation(ws):
    tok = AutoTokenizer.from_pretrained(ws["tokenizer"])
    prompt = tok("The values are:", add_special_tokens=False)["input_ids"]
    stop = retrieval.AnswersFound(tok, len(prompt), ["123", "Blue"])
    steps = [tok(t, add_special_tokens=False)["input_ids"] for t in (" 12", "3 and", " blue", " tail")]
    seen, flags = list(prompt), []
    for piece in steps:
        seen += piece
        flags.append(bool(stop(torch.tensor([seen]), None)[0]))
    assert flags == [False, False, True, True]  # case-insensitive, like the score; never before both are there
    assert not stop(torch.tensor([prompt + tok(" 123 blu", add_special_tokens=False)["input_ids"]]), None)[0]


def test_needles_sit_at_the_requested_depth_and_regions_mark_them(ws):
    tok = AutoTokenizer.from_pretrained(ws["tokenizer"])
    spec = dict(num_keys=3, num_values=2, num_queries=2, key_type="words", value_type="numbers", haystack="words")
    count = retrieval.token_counter(tok)
    first = retrieval.make_prompt(random.Random(1), spec, 400, 0.0, count)
    last = retrieval.make_prompt(random.Random(1), spec, 400, 1.0, count)
    intro = synthetic.INTRO.format(kind="numbers")
    assert first.text.startswith(intro + " One of the special magic numbers for")
    context, question = last.text.split("\n")
    assert context.endswith(f"is: {last.answers[-1]}.") and question.startswith("What are all")
    ids, regions = retrieval.token_regions(tok, first)
    text_of = lambda r: tok.decode([i for i, g in zip(ids, regions) if g == retrieval.REGIONS.index(r)])  # noqa: E731
    assert all(a in text_of("needle") for a in first.answers)
    assert not any(a in text_of("haystack") + text_of("distractor") for a in first.answers)
    assert text_of("question").strip().startswith("What are all")


def test_router_probe_agrees_with_the_model(ws):
    from l2a_train.evaluation.loading import load_model

    model, _ = load_model(OmegaConf.create({"path": str(ws["l2a"])}))
    ids = torch.randint(0, 512, (1, 300), generator=torch.Generator().manual_seed(0))
    probe = RouterProbe(model)
    probe.start()
    with torch.no_grad():
        out = model.model(input_ids=ids)
    probe.finish(300, 300, None)
    probe.close()
    torch.testing.assert_close(torch.tensor(probe.summary()["by_length"]["300"]), out.routed_fraction.double(),
                               rtol=0, atol=1e-6, check_dtype=False)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["eval.retrieval.lengths=[8192]"], "exceeds the model's 4096 positions"),
        (["model.max_position_embeddings=256", "eval.retrieval.enabled=false"], "exceed the model's 256 positions"),
        (["eval.retrieval.depths=[1.5]"], "depths"),
        (["+eval.retrieval.tasks.odd={num_keys: 1, num_values: 1, num_queries: 2}"], "num_queries"),
        (["eval.perplexity.buckets=[0,512,128]"], "increasing"),
        (["tokenizer=/nowhere"], "no Hugging Face tokenizer"),
    ],
)
def test_bad_settings_are_one_clear_error_and_nothing_is_written(ws, tmp_path, overrides, message):
    out = tmp_path / "out"
    with pytest.raises(UserError, match=message):
        run_eval(ws, "l2a", out, *overrides)
    assert not list(tmp_path.iterdir())


def test_bad_checkpoints_and_existing_output(ws, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2)).save_pretrained(tmp_path / "llama")
    with pytest.raises(UserError, match="'llama' model"):
        evaluate(compose("eval", [f"model.path={tmp_path / 'llama'}", f"output={tmp_path / 'o1'}", *SUITE]))
    with pytest.raises(UserError, match="does not exist"):
        evaluate(compose("eval", [f"model.path={tmp_path / 'nowhere'}", f"output={tmp_path / 'o2'}", *SUITE]))
    (tmp_path / "o3").mkdir()
    with pytest.raises(UserError, match="already exists"):
        run_eval(ws, "l2a", tmp_path / "o3")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama", "o3"] and not list((tmp_path / "o3").iterdir())
