"""`l2a-prep`: the Hydra entry point (config: configs/prep.yaml, recipes in configs/prep/)."""

from __future__ import annotations

import logging

from omegaconf import DictConfig, OmegaConf

from l2a_configs import UserError, hydra_app

from .pipeline import prepare

log = logging.getLogger("l2a_data_prep")


def summary(manifest: dict) -> str:
    lines = [
        f"{manifest['num_rows']} rows x {manifest['seq_len']} tokens, {manifest['documents']} documents, "
        f"{manifest['tokens']} tokens (+{manifest['pad_tokens']} padding)"
    ]
    for domain, d in manifest["domains"].items():
        requested = "-" if d["requested"] is None else f"{d['requested']:.3f}"
        lines.append(f"  domain {domain}: {d['tokens']} tokens, share {d['achieved']:.3f} (requested {requested})")
    for reason, count in manifest["skipped"].items():
        lines.append(f"  skipped {count} records: {reason}")
    return "\n".join(lines)


def run(cfg: DictConfig) -> dict | None:
    if OmegaConf.is_missing(cfg, "output"):
        raise UserError("output is not set: give the directory to write, e.g. output=data/my-corpus")
    config = OmegaConf.to_container(cfg, resolve=True)
    manifest = prepare(config)
    if manifest is not None:
        log.info("wrote %s\n%s", config["output"], summary(manifest))
    return manifest


main = hydra_app("prep")(run)
