"""Loading any checkpoint for evaluation: a base Qwen2.5/Qwen3 model, a full-attention or L2A
model trained by l2a-train, or a pruned L2A model.

A base checkpoint is converted in memory with `l2a.mode=full` (every layer "global"): the same
computation as the base model (tests/test_model.py checks that), but through the L2A forward,
so every checkpoint runs the same code (document masks on packed rows, the KV cache, router
statistics).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import OmegaConf

from l2a_common import UserError
from l2a_data_prep.tokenizer import has_tokenizer

from ..checkpoint_config import read_config

log = logging.getLogger(__name__)
DTYPES = ("float32", "bfloat16", "float16")


def checkpoint_type(path) -> str:
    from l2a_train.model.convert import read_model_type

    if not path:
        raise UserError("model.path is not set: give a checkpoint directory (base Qwen, L2A or pruned)")
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"model.path={path} does not exist; give a local Hugging Face checkpoint directory")
    return read_model_type(path)


def supported_type(path) -> str:
    """The checkpoint's model_type, refused unless l2a-eval can run it (checked before anything loads)."""
    kind = checkpoint_type(path)
    if kind in ("qwen2", "qwen3") or kind.startswith("l2a_"):
        return kind
    raise UserError(
        f"model.path={path} holds a '{kind}' model; l2a-eval evaluates Qwen2/Qwen2.5/Qwen3 base checkpoints "
        "and L2A checkpoints (l2a_qwen2 / l2a_qwen3)"
    )


def checkpoint_dtype(path: Path, requested) -> str:
    if requested is not None:
        if str(requested) not in DTYPES:
            raise UserError(f"model.dtype='{requested}' is not one of {DTYPES} (or null: the checkpoint's own)")
        return str(requested)
    config = read_config(path)
    stored = str(config.get("dtype") or config.get("torch_dtype") or "float32")
    return stored if stored in DTYPES else "float32"


def load_model(model_cfg, backend: str | None = None, device: torch.device | None = None):
    """(model in eval mode on `device`, a description of the checkpoint)."""
    from l2a_train.model import build_model, l2a_group

    kind = supported_type(model_cfg.get("path"))
    path = Path(model_cfg.path)
    node = dict(
        path=str(path),
        dtype=checkpoint_dtype(path, model_cfg.get("dtype")),
        rope_theta=model_cfg.get("rope_theta"),
        max_position_embeddings=model_cfg.get("max_position_embeddings"),
    )
    backend_override = [f"backend={backend}"] if backend else []
    if kind in ("qwen2", "qwen3"):  # converted on the fly with the l2a=full group
        node["family"] = kind
        l2a = l2a_group("full", backend_override)
        source = f"base {kind} checkpoint, run as full attention"
    else:  # the checkpoint's own L2A settings, but for the backend asked for
        l2a = OmegaConf.create({"backend": backend} if backend else {})
        source = "L2A checkpoint"
    model = build_model(OmegaConf.create(node), l2a, device=device)
    model.eval()
    return model, source


def max_positions(model) -> int:
    return int(model.config.max_position_embeddings)


def configured_positions(model_cfg) -> int:
    """The positions the model will have, from config.json and the override: checks before loading."""
    supported_type(model_cfg.get("path"))
    if model_cfg.get("max_position_embeddings") is not None:
        return int(model_cfg.max_position_embeddings)
    config = read_config(model_cfg.path)
    return int(config.get("max_position_embeddings") or 0) or 2**31


def load_tokenizer(tokenizer_path, model_path, data_path=None, required: bool = True):
    """The tokenizer: `tokenizer=` if set, else the checkpoint's own, else the held-out data's."""
    from transformers import AutoTokenizer

    candidates = [Path(tokenizer_path)] if tokenizer_path else [Path(model_path)]
    if not tokenizer_path and data_path and (Path(data_path) / "tokenizer").is_dir():
        candidates.append(Path(data_path) / "tokenizer")
    for path in candidates:
        if has_tokenizer(path):
            return AutoTokenizer.from_pretrained(str(path))
    if tokenizer_path:
        raise UserError(f"tokenizer={tokenizer_path}: no Hugging Face tokenizer there (tokenizer.json / tokenizer_config.json)")
    if required:
        raise UserError(
            f"no tokenizer in {model_path}{' or the data directory' if data_path else ''}: the retrieval suite "
            "needs one; pass tokenizer=<dir> (or eval.retrieval.enabled=false)"
        )
    return None


def check_tokenizer(tokenizer, model) -> None:
    if len(tokenizer) > model.config.vocab_size:
        raise UserError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {model.config.vocab_size}: "
            "pass the model's own tokenizer (tokenizer=<dir>)"
        )
