"""Broken checkpoints and settings that would write a useless model, as users meet them: one
`error:` line naming the file or the setting and exit status 2 (before: a 26- to 41-line
traceback, or a written model with no L2A layer / an unpruned "pruned" copy), nothing written.

The weights checks live in `l2a_train.model.convert.load_checkpoint`, which l2a-convert,
l2a-train, l2a-eval and l2a-prune all load through.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import l2a_train  # noqa: F401  (registers the Auto classes)
from l2a_common import UserError, compose
from l2a_train.convert_checkpoint import convert
from l2a_train.evaluation.evaluate import evaluate
from l2a_train.model import build_base, convert_model
from l2a_train.prune_checkpoint import prune

BIN = Path(sys.executable).parent
pytestmark = pytest.mark.usefixtures("single_thread")


def run(cmd: list, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def one_error(proc: subprocess.CompletedProcess) -> str:
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-4000:]
    return errors[0]


def tiny_tokenizer(out: Path) -> None:
    """A 300-token byte-level BPE: enough for the synthetic calibration prompts of l2a-prune."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = ["The grass is green. The sky is blue. One of the special magic numbers for amber-anchor is: 1234567."] * 50
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(str(out))


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    """A saved tiny Qwen3 base checkpoint and its L2A conversion (with a tokenizer)."""
    root = tmp_path_factory.mktemp("checkpoints")
    cfg = compose("convert", ["model=tiny_qwen3", "output=unused", "l2a.window=64"])
    base = build_base(cfg.model)
    base.save_pretrained(root / "base")
    convert_model(base, cfg.l2a, cfg.model).save_pretrained(root / "l2a")
    tiny_tokenizer(root / "l2a")
    return {"root": root, "base": root / "base", "l2a": root / "l2a"}


def edit_config(path: Path, layers: int) -> None:
    """config.json claims `layers` layers; its per-layer lists follow, so it stays valid in itself."""
    config = json.loads((path / "config.json").read_text())
    config["num_hidden_layers"] = layers
    for key in ("layer_types", "l2a_layer_types"):
        if key in config and layers > len(config[key]):
            config[key] = config[key] + config[key][: layers - len(config[key])]
    (path / "config.json").write_text(json.dumps(config))


def damage(src: Path, dst: Path, how: str) -> Path:
    shutil.copytree(src, dst)
    weights = dst / "model.safetensors"
    data = weights.read_bytes()
    if how == "truncated":
        weights.write_bytes(data[: len(data) // 2])
    elif how == "zeroed":
        weights.write_bytes(bytes(len(data)))
    elif how == "not safetensors":
        weights.write_text("<html><body>404 Not Found</body></html>\n")
    elif how == "config has more layers":
        edit_config(dst, 6)
    elif how == "config has fewer layers":  # its layer lists keep 4 entries: invalid in itself too
        edit_config(dst, 2)
    elif how == "missing shard":
        weights.rename(dst / "model-00001-of-00002.safetensors")
        names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
        index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": names[0], "model.norm.weight": names[1]}}
        (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    return dst


DAMAGE = [
    ("truncated", "model.safetensors is truncated or not a safetensors file (Error while deserializing header"),
    ("zeroed", "model.safetensors is truncated or not a safetensors file"),
    ("not safetensors", "model.safetensors is truncated or not a safetensors file"),
    ("config has more layers", "config.json says 6 layers (num_hidden_layers) but model.safetensors holds weights for 4"),
    ("config has fewer layers", "config.json says 2 layers (num_hidden_layers) but model.safetensors holds weights for 4"),
    ("missing shard", "model.safetensors.index.json names 2 weight shards, 1 of them missing (model-00002-of-00002"),
]


@pytest.mark.parametrize("how, message", DAMAGE)
def test_convert_refuses_a_damaged_base_checkpoint_in_one_line(ckpts, tmp_path, how, message):
    broken = damage(ckpts["base"], tmp_path / "broken", how)
    with pytest.raises(UserError) as err:
        convert(compose("convert", [f"model.path={broken}", f"output={tmp_path / 'out'}"]))
    assert str(err.value).startswith(f"model.path={broken}: ") and message in str(err.value)
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()


@pytest.mark.parametrize("how, message", [DAMAGE[0], DAMAGE[3]])
def test_eval_and_prune_refuse_a_damaged_l2a_checkpoint_in_one_line(ckpts, tmp_path, how, message):
    broken = damage(ckpts["l2a"], tmp_path / "broken", how)
    with pytest.raises(UserError, match=f"^model.path={broken}: ") as err:
        evaluate(compose("eval", [f"model.path={broken}", f"output={tmp_path / 'e'}", "eval.retrieval.enabled=false",
                                  "device=cpu"]))
    assert message in str(err.value)
    with pytest.raises(UserError, match=f"^model.path={broken}: ") as err:
        prune(compose("prune", [f"model.path={broken}", f"output={tmp_path / 'p'}", "k=1", "eval_change=false",
                                "device=cpu"]))
    assert message in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]


@pytest.mark.e2e
def test_the_commands_print_one_line_for_a_truncated_checkpoint(ckpts, tmp_path):
    base = damage(ckpts["base"], tmp_path / "base", "truncated")
    l2a = damage(ckpts["l2a"], tmp_path / "l2a", "truncated")
    for cmd, path in ((["l2a-convert"], base), (["l2a-eval", "eval.retrieval.enabled=false"], l2a),
                      (["l2a-prune", "k=1", "eval_change=false"], l2a)):
        error = one_error(run([BIN / cmd[0], *cmd[1:], f"model.path={path}", "output=out"], tmp_path))
        assert f"model.path={path}: model.safetensors is truncated or not a safetensors file" in error
        assert "re-download or re-export it" in error
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["l2a.layers=[]"], "l2a.layers=[] selects none of the model's 4 layers, so no layer would be converted"),
        (["l2a=swa", "l2a.layers=[]"], "l2a.layers=[] selects none of the model's 4 layers"),
        (["l2a.layers=every:8"], "l2a.layers=every:8 selects none of the model's 4 layers"),
        (["l2a.window=4096"], "l2a.window=4096 is not smaller than the model's 4096 positions"),
        (["l2a.window=100000", "l2a=static"], "l2a.window=100000 is not smaller than the model's 4096 positions"),
        (["l2a.window=5000", "model.max_position_embeddings=2048"], "l2a.window=5000 is not smaller than the model's 2048"),
    ],
)
def test_convert_refuses_a_model_without_l2a_layers_or_with_a_window_past_its_positions(tmp_path, overrides, message):
    with pytest.raises(UserError) as err:
        convert(compose("convert", [f"output={tmp_path / 'out'}", *overrides]))
    assert message in str(err.value) and not list(tmp_path.iterdir())


def test_full_attention_ignores_layers_and_window(tmp_path):
    """l2a=full has no windowed layer: its window and layer list mean nothing and stay allowed."""
    convert(compose("convert", [f"output={tmp_path / 'full'}", "l2a=full", "l2a.window=100000", "l2a.layers=[]"]))
    config = json.loads((tmp_path / "full" / "config.json").read_text())
    assert config["l2a_layer_types"] == ["global"] * 4


@pytest.mark.e2e
def test_convert_and_prune_settings_that_change_nothing_are_one_line_from_the_command(ckpts, tmp_path):
    error = one_error(run([BIN / "l2a-convert", "l2a.layers=[]", "output=out"], tmp_path))
    assert "l2a.layers=[] selects none" in error and "l2a=full for a full-attention model" in error
    error = one_error(run([BIN / "l2a-prune", f"model.path={ckpts['l2a']}", "k=0", "output=out"], tmp_path))
    assert error.startswith("error: k=0 prunes no layer") and "k >= 1" in error and "k=null" in error
    assert not (tmp_path / "out").exists()  # the window and threshold=0: tests above and in test_prune.py


@pytest.mark.e2e
@pytest.mark.parametrize("device, message", [
    ("tpu0", "device=tpu0: not a device; use auto, cpu or cuda[:N]"),
    ("meta", "device=meta: the commands run on cpu or cuda[:N] (or auto)"),
] + ([] if torch.cuda.is_available() else [("cuda", "device=cuda: this machine has no CUDA GPU")]))
def test_convert_names_a_bad_device_in_one_line(tmp_path, device, message):
    error = one_error(run([BIN / "l2a-convert", f"device={device}", "output=out"], tmp_path))
    assert message in error and not (tmp_path / "out").exists()


@pytest.mark.e2e
@pytest.mark.parametrize("command, arg, message", [
    ("l2a-convert", "layers=[]", "`layers=[]`: l2a-convert has no setting layers; did you mean l2a.layers?"),
    ("l2a-train", "trainer.lr_schedul=cosine", "`trainer.lr_schedul=cosine`: l2a-train has no setting trainer.lr_schedul"),
    ("l2a-prep", "windows=5", "`windows=5`: l2a-prep has no setting windows"),
])
def test_a_setting_that_does_not_exist_is_one_line_from_the_command(tmp_path, command, arg, message):
    """Hydra's own message for an unknown key is five lines and exit 1; ours names the setting meant."""
    error = one_error(run([BIN / command, arg, "output=out"], tmp_path))
    assert message in error and "+" in error and not (tmp_path / "out").exists()


@pytest.mark.e2e
def test_an_empty_argument_is_one_line_from_the_command(tmp_path):
    """`l2a-train ... "$EXTRA"` with EXTRA unset: Hydra reports a parser error at <EOF> and exit 1."""
    error = one_error(run([BIN / "l2a-train", "experiment=quickstart", "", "output=out"], tmp_path))
    assert "argument 2 of the command line is empty" in error and not (tmp_path / "out").exists()
