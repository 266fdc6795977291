"""`l2a-prep`: the Hydra entry point (config: configs/prep.yaml, recipes in configs/prep/)."""

from __future__ import annotations

import logging

from omegaconf import DictConfig, OmegaConf

from l2a_common import UserError, hydra_app

from .pipeline import prepare

log = logging.getLogger("l2a_data_prep")


def _reasons(counts: dict) -> str:
    return ", ".join(f"{reason} {n}" for reason, n in counts.items())


def _source_line(name: str, st: dict) -> str:
    """Where a source's records went: read = kept + skipped, left unread, then copies apart."""
    skipped = sum(st["skipped"].values())
    unread = "not counted" if st["left_unread"] is None else st["left_unread"]
    line = (f"  source {name}: read {st['read']}, kept {st['kept']}, skipped {skipped}"
            + (f" ({_reasons(st['skipped'])})" if skipped else "") + f", left unread {unread}")
    if st["copies"] or st["copies_skipped"]:
        line += f"; {st['copies']} copies (upsampling, epochs)"
        if st["copies_skipped"]:
            line += f", {sum(st['copies_skipped'].values())} more skipped ({_reasons(st['copies_skipped'])})"
    return line


def _unread_line(manifest: dict) -> str:
    """The last line of the log: how much input the data set does not hold, and why."""
    ended = manifest["ended"]
    if manifest["left_unread"] is None:
        return f"left unread: not counted (count_unread=false); the stream ended: {ended}"
    if not manifest["left_unread"]:
        return f"left unread: none ({ended})"
    per_source = ", ".join(f"{name} {st['left_unread']}" for name, st in manifest["sources"].items() if st["left_unread"])
    return f"left unread: {manifest['left_unread']} records ({per_source}); the stream ended: {ended}"


def summary(manifest: dict) -> str:
    lines = [
        f"{manifest['num_rows']} rows x {manifest['seq_len']} tokens, {manifest['documents']} documents, "
        f"{manifest['tokens']} tokens (+{manifest['pad_tokens']} padding)"
    ]
    for domain, d in manifest["domains"].items():
        requested = "-" if d["requested"] is None else f"{d['requested']:.3f}"
        lines.append(f"  domain {domain}: {d['tokens']} tokens, share {d['achieved']:.3f} (requested {requested})")
    accounted = "left_unread" in manifest  # manifests of older versions lack the per-source accounting
    if accounted:
        lines.extend(_source_line(name, st) for name, st in manifest["sources"].items())
    for reason, count in manifest["skipped"].items():
        lines.append(f"  skipped {count} records: {reason}")
    if accounted:
        lines.append(_unread_line(manifest))
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
