"""The document stream: sources grouped into domains, mixed by `domain@proportion`.

Everything here runs before tokenization, so it is cheap and every process of a prep
(resumed, or one of several machines packing a shard range) replays the identical stream.
Document sizes are counted in estimated tokens: characters / the domain's characters per
token, measured on a sample of the domain at start-up. The achieved proportions, in real
tokens, are reported in the manifest next to the requested ones.

- Mixing: the next document comes from the domain furthest behind its share (a
  deterministic deficit rule, no random draws), so proportions hold at every prefix to
  within one document. The mixture ends when a domain runs out, so it never drifts.
- Upsampling: `upsample.factor` passes over a domain per epoch; passes after the first keep
  only documents of at least `upsample.min_tokens` (estimated), so long documents appear
  `factor` times, far apart.
- Epochs: a domain is read up to `max_epochs` times (only useful with `max_tokens`).
- Dedup: exact duplicates (by a 128-bit hash of the text) are dropped and counted; memory is
  about 100 bytes per unique document.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterator

from l2a_configs import UserError

from . import sources as sources_mod
from .records import Doc, Skip


@dataclass
class Event:
    source: str
    domain: str
    record: Doc | Skip
    est_tokens: float = 0.0  # estimated tokens of a Doc


def parse_mixture(items, domains: list[str]) -> dict[str, float]:
    """["code@0.7", "web@0.3"] -> {"code": 0.7, "web": 0.3}, normalised, validated."""
    weights: dict[str, float] = {}
    for item in items or []:
        domain, sep, value = str(item).rpartition("@")
        try:
            weight = float(value)
        except ValueError:
            weight = -1.0
        if not sep or not domain or weight <= 0:
            raise UserError(f"mixture entry '{item}' must be domain@proportion with a proportion > 0, e.g. code@0.7")
        if domain in weights:
            raise UserError(f"mixture lists domain '{domain}' twice")
        if domain not in domains:
            raise UserError(f"mixture domain '{domain}' has no source; sources' domains: {', '.join(domains)}")
        weights[domain] = weight
    if weights:
        missing = [d for d in domains if d not in weights]
        if missing:
            raise UserError(
                f"domains {', '.join(missing)} have sources but no mixture entry; add e.g. {missing[0]}@0.1 "
                "or remove those sources"
            )
        total = sum(weights.values())
        weights = {d: w / total for d, w in weights.items()}
    return weights


class Dedup:
    def __init__(self) -> None:
        self.seen: set[int] = set()
        self.duplicates: set[tuple[str, int]] = set()  # (domain, ordinal) to drop again on later passes

    def first_pass(self, text: str, domain: str, ordinal: int) -> bool:
        key = int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest(), "little")
        if key in self.seen:
            self.duplicates.add((domain, ordinal))
            return False
        self.seen.add(key)
        return True


def domain_stream(
    domain: str,
    specs: dict[str, dict],
    chars_per_token: float,
    cfg: dict,
    dedup: Dedup | None,
) -> Iterator[Event]:
    """One domain's records: epochs x upsampling passes over its sources, in config order."""
    factor = int(cfg["upsample"]["factor"])
    min_long = cfg["upsample"]["min_tokens"]
    for epoch in range(int(cfg["max_epochs"])):
        for upsample_pass in range(factor):
            first = epoch == 0 and upsample_pass == 0
            if upsample_pass > 0 and min_long is None:
                break
            ordinal = 0
            for name, spec in specs.items():
                for record in sources_mod.read(name, spec):
                    if isinstance(record, Skip):
                        if first:  # bad records are counted once, not once per pass
                            yield Event(name, domain, record)
                        continue
                    ordinal += 1
                    est = len(record.text) / chars_per_token
                    if upsample_pass > 0 and est < min_long:
                        continue
                    if dedup is not None:
                        if first and not dedup.first_pass(record.text, domain, ordinal):
                            yield Event(name, domain, Skip("duplicate", record.ref, "exact duplicate of an earlier document"))
                            continue
                        if not first and (domain, ordinal) in dedup.duplicates:
                            continue
                    yield Event(name, domain, record, est)


def mix(
    by_domain: dict[str, dict[str, dict]],
    weights: dict[str, float],
    chars_per_token: dict[str, float],
    cfg: dict,
) -> Iterator[Event]:
    """The whole prep's stream of events, deterministic for a config."""
    dedup = Dedup() if cfg["dedup"] else None
    streams = {d: domain_stream(d, specs, chars_per_token[d], cfg, dedup) for d, specs in by_domain.items()}
    budget = cfg["max_tokens"]
    total = 0.0
    if not weights:  # no mixture: the domains one after another, in config order
        for stream in streams.values():
            for event in stream:
                if budget is not None and total >= budget:
                    return
                total += event.est_tokens
                yield event
        return
    emitted = {d: 0.0 for d in weights}
    order = list(weights)
    while budget is None or total < budget:
        domain = min(order, key=lambda d: (emitted[d] / weights[d], order.index(d)))
        event = next(streams[domain], None)
        if event is None:
            return  # this domain ran out: going on would skew the proportions
        emitted[domain] += event.est_tokens
        total += event.est_tokens
        yield event
