"""l2a-eval / l2a-prune with two very different tokenizers, as users run them (console scripts):

- the default suite (eval=quick) fits every length and task with the quickstart's 4096-token BPE
  and with a 24K-token byte-level BPE trained on the standard library (about a fifth fewer
  characters per token on retrieval prompts); before, `could not fit a retrieval prompt into 992
  tokens (seed 0:single_needle:1024:0.0:0)` with the first and similar with others;
- a length too short for a task is one line naming eval.retrieval.lengths, before the model loads;
- data prepared with another tokenizer than the checkpoint's is refused (eval and prune), unless
  data.allow_tokenizer_mismatch=true.

"Before the model loads" is checked with a copy of the checkpoint whose weights are truncated:
an error about the settings, not about the weights, means the weights were never read.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from l2a_common import UserError, compose
from l2a_train.evaluation import retrieval
from l2a_train.prune_checkpoint import prune

pytestmark = pytest.mark.e2e  # runs the commands as a user does; `pytest -m "not e2e"` runs the unit tests

BIN = Path(sys.executable).parent
WIDE_VOCAB = 24000
SMALL_DATA = ["max_tokens=40000", "tokenizer.estimate_chars=50000", "shards.tokens=16000", "progress=false"]


def run(cmd: list, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline",
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def one_error(proc: subprocess.CompletedProcess) -> str:
    """The single `error:` line of a command that failed the way bad input should."""
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-4000:]
    return errors[0]


def train_wide_tokenizer(out: Path) -> Path:
    """A 24K byte-level BPE with GPT-2's pre-tokenizer (digit runs kept together, unlike the
    built-in BPE's Qwen split), trained on ~3 MB of this Python's standard library: nothing to
    download, and its characters per token differ markedly from the quickstart's 4K BPE."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts, size = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        texts.append(path.read_text(encoding="utf-8", errors="replace"))
        size += len(texts[-1])
        if size > 3_000_000:
            break
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=WIDE_VOCAB, special_tokens=["<|endoftext|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>").save_pretrained(str(out))
    return out


def broken_copy(model: Path, out: Path) -> Path:
    """The checkpoint with its weights cut short: loading it is an error of its own."""
    shutil.copytree(model, out)
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:4096])
    return out


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> dict:
    """Per tokenizer ('bpe': the quickstart's, 'wide': 24K), packed data and an L2A checkpoint."""
    root = tmp_path_factory.mktemp("tokenizers")
    ok(run([BIN / "l2a-prep", "prep=quickstart", "output=bpe-data", "tokenizer.train.cache_dir=tok", *SMALL_DATA], root))
    wide = train_wide_tokenizer(root / "wide-tokenizer")
    ok(run([BIN / "l2a-prep", "prep=quickstart", "output=wide-data", f"tokenizer.path={wide}", *SMALL_DATA], root))
    ok(run([BIN / "l2a-convert", "l2a.window=64", "tokenizer=bpe-data/tokenizer", "output=bpe-model"], root))
    ok(run([BIN / "l2a-convert", "l2a.window=64", f"model.config.vocab_size={WIDE_VOCAB}", f"tokenizer={wide}",
            "output=wide-model"], root))
    return {"root": root, **{f"{k}-{t}": root / f"{k}-{t}" for k in ("bpe", "wide") for t in ("data", "model")},
            "bpe-tokenizer": root / "bpe-data" / "tokenizer", "wide-tokenizer": wide}


def test_the_two_tokenizers_differ_markedly(ws):
    spec = retrieval.tasks_of(compose("eval", ["model.path=x", "output=x"]).eval.retrieval)["single_needle"]
    ratio = {}
    for name in ("bpe", "wide"):
        tok = AutoTokenizer.from_pretrained(ws[f"{name}-tokenizer"])
        prompt = retrieval.fitted_prompt("0:x", spec, 4000, 0.5, tok, retrieval.token_counter(tok))
        ratio[name] = len(prompt.text) / retrieval.prompt_tokens(tok, prompt.text)
    assert ratio["bpe"] > 1.2 * ratio["wide"], ratio


@pytest.mark.parametrize("name", ["bpe", "wide"])
def test_default_suite_runs_with_each_tokenizer(ws, name):
    out = ws["root"] / f"eval-{name}"
    ok(run([BIN / "l2a-eval", f"model.path={ws[f'{name}-model']}", f"data.path={ws[f'{name}-data']}", f"output={out}",
            "device=cpu"], ws["root"]))
    results = json.loads((out / "eval.json").read_text())
    assert results["config"]["eval"]["retrieval"]["lengths"] == [512, 1024]  # the default suite, untouched
    assert list(results["retrieval"]["tasks"]) == ["single_needle", "multi_key", "multi_value", "multi_query"]
    for task in results["retrieval"]["tasks"].values():
        assert [(c["length"], c["depth"]) for c in task["cells"]] == [(L, d) for L in (512, 1024) for d in (0.0, 0.5, 1.0)]
        for cell in task["cells"]:  # prompt + 32 new tokens within the length, and close to it
            assert cell["length"] - 32 - 40 <= cell["mean_tokens"] <= cell["length"] - 32, cell
    assert results["perplexity"]["all"]["tokens"] > 0


@pytest.mark.parametrize("name", ["bpe", "wide"])
def test_every_prompt_fits_its_length_within_one_sentence(ws, name):
    """Every prompt of the quick suite and of the ruler suite's shorter lengths: at most the
    length minus max_new_tokens, within one haystack sentence of it, the same when made again."""
    tok = AutoTokenizer.from_pretrained(ws[f"{name}-tokenizer"])
    count = retrieval.token_counter(tok)
    suites = [compose("eval", ["model.path=x", "output=x"]).eval.retrieval,
              compose("eval", ["model.path=x", "output=x", "eval=ruler", "eval.retrieval.lengths=[4096,16384]",
                               "eval.retrieval.samples=1"]).eval.retrieval,
              compose("eval", ["model.path=x", "output=x", "eval.retrieval.haystack=words"]).eval.retrieval]
    for suite in suites:
        for _, spec, length, depth, seed in retrieval.prompt_cells(suite):
            budget = length - int(suite.max_new_tokens)
            prompt = retrieval.fitted_prompt(seed, spec, budget, depth, tok, count)
            n = retrieval.prompt_tokens(tok, prompt.text)
            assert budget - retrieval.sentence_tokens(spec, count) <= n <= budget, (seed, n, budget)
            assert retrieval.fitted_prompt(seed, spec, budget, depth, tok, count).text == prompt.text


def test_a_length_too_short_for_a_task_is_one_line_before_the_model_loads(ws):
    broken = broken_copy(ws["wide-model"], ws["root"] / "wide-broken-1")
    short = "eval.retrieval.lengths=[112,1024]"  # above max_new_tokens + 64; too short for 4 needles
    error = one_error(run([BIN / "l2a-eval", f"model.path={broken}", f"data.path={ws['wide-data']}", "output=never",
                           short], ws["root"]))
    assert "eval.retrieval.lengths=[112, 1024]: 112 tokens cannot hold a single_needle prompt" in error
    assert "use lengths of at least" in error
    error = one_error(run([BIN / "l2a-prune", f"model.path={broken}", "k=1", "eval_change=false", "output=never", short],
                          ws["root"]))  # the synthetic calibration prompts use the suite's lengths too
    assert "eval.retrieval.lengths=[112, 1024]: 112 tokens cannot hold" in error
    assert not (ws["root"] / "never").exists()


def test_prune_with_synthetic_calibration_and_the_default_lengths(ws):
    out = ws["root"] / "wide-pruned"
    ok(run([BIN / "l2a-prune", f"model.path={ws['wide-model']}", "k=1", "eval.retrieval.samples=1",
            "eval.retrieval.depths=[0.5]", "device=cpu", f"output={out}"], ws["root"]))
    report = json.loads((out / "prune_report.json").read_text())
    assert len(report["pruned_layers"]) == 1 and report["calibration"]["data"].startswith("8 synthetic retrieval prompts")
    assert list(report["eval"]["change"]["retrieval"]["tasks"]) == ["single_needle", "multi_key", "multi_value", "multi_query"]


def test_data_of_another_tokenizer_is_refused_before_the_model_loads(ws):
    broken = broken_copy(ws["wide-model"], ws["root"] / "wide-broken-2")
    error = one_error(run([BIN / "l2a-eval", f"model.path={broken}", f"data.path={ws['bpe-data']}", "output=never"],
                          ws["root"]))
    assert f"data.path={ws['bpe-data']} was prepared with another tokenizer than model.path={broken}" in error
    assert "4096 tokens" in error and f"{WIDE_VOCAB}" in error and "data.allow_tokenizer_mismatch=true" in error
    error = one_error(run([BIN / "l2a-prune", f"model.path={broken}", f"calibration.path={ws['bpe-data']}", "k=1",
                           "output=never"], ws["root"]))
    assert f"calibration.path={ws['bpe-data']} was prepared with another tokenizer" in error
    cfg = compose("prune", [f"model.path={broken}", f"calibration.path={ws['wide-data']}", f"data.path={ws['bpe-data']}",
                            "k=1", f"output={ws['root'] / 'never'}"])
    with pytest.raises(UserError, match=f"^data.path={ws['bpe-data']} was prepared with another tokenizer"):
        prune(cfg)
    assert not (ws["root"] / "never").exists()


def test_allow_tokenizer_mismatch_runs_with_a_warning(ws):
    out = ws["root"] / "eval-allowed"
    proc = ok(run([BIN / "l2a-eval", f"model.path={ws['wide-model']}", f"data.path={ws['bpe-data']}", f"output={out}",
                   "data.allow_tokenizer_mismatch=true", "eval.retrieval.enabled=false", "data.max_rows=1", "device=cpu"],
                  ws["root"]))
    assert "going on because data.allow_tokenizer_mismatch=true" in proc.stdout + proc.stderr
    assert json.loads((out / "eval.json").read_text())["perplexity"]["rows"] == 1
