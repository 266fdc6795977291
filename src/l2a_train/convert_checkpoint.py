"""What `l2a-convert` does: a base Qwen2/Qwen3 checkpoint (or a config) -> an L2A checkpoint directory
(the in-memory conversion is `l2a_train.model.convert`).

Everything is validated and built in memory first, then written to a temporary sibling
directory and renamed, so a failed conversion never leaves a half-written output.
"""

from __future__ import annotations

import logging
from pathlib import Path

from l2a_common import UserError

from .atomic import write_atomically
from .devices import resolve_device

log = logging.getLogger("l2a-convert")


def resolve_tokenizer_dir(cfg) -> Path | None:
    if cfg.get("tokenizer"):
        path = Path(cfg.tokenizer)
        if not (path / "tokenizer_config.json").is_file() and not (path / "tokenizer.json").is_file():
            raise UserError(f"tokenizer={path}: no Hugging Face tokenizer there (tokenizer.json / tokenizer_config.json)")
        return path
    if cfg.model.get("path"):
        path = Path(cfg.model.path)
        if (path / "tokenizer_config.json").is_file() or (path / "tokenizer.json").is_file():
            return path
    return None


def convert(cfg) -> Path:
    from transformers import AutoTokenizer

    from l2a_train.model import build_base, convert_model

    output = Path(cfg.output)
    if output.exists() and not cfg.overwrite:  # fail before any heavy work
        raise UserError(f"output={output} already exists; choose another directory or pass overwrite=true")
    tokenizer_dir = resolve_tokenizer_dir(cfg)
    base = build_base(cfg.model, resolve_device(cfg.device))
    model = convert_model(base, cfg.l2a, cfg.model)
    if tokenizer_dir is not None:
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        if len(tokenizer) > model.config.vocab_size:
            raise UserError(
                f"tokenizer {tokenizer_dir} has {len(tokenizer)} tokens but the model's vocab_size is "
                f"{model.config.vocab_size}; use the model's own tokenizer or a larger model.config.vocab_size"
            )

    def write(tmp: Path) -> None:
        model.save_pretrained(str(tmp), safe_serialization=True)
        if tokenizer_dir is not None:
            tokenizer.save_pretrained(str(tmp))

    write_atomically(output, bool(cfg.overwrite), write)
    kinds = model.config.l2a_layer_types
    log.info(
        "wrote %s: %s, %d layers (%d l2a, %d swa, %d global), window %d",
        output, model.config.model_type, len(kinds), kinds.count("l2a"), kinds.count("swa"),
        kinds.count("global"), model.config.l2a_window,
    )
    return output

