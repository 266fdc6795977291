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
- Accounting: events of later passes are marked `copy`, and once the stream is over the
  records it never reached are counted (`Mixture.unread`), so the manifest accounts for
  every input record: kept, skipped by reason, or left unread.
- Dedup: exact duplicates (by a 128-bit hash of the text) are dropped and counted; memory is
  about 100 bytes per unique document.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterator

from l2a_common import UserError

from . import sources as sources_mod
from .records import Doc, Skip

READ_TO_THE_END = "every source read to the end"


@dataclass
class Event:
    source: str
    domain: str
    record: Doc | Skip
    est_tokens: float = 0.0  # estimated tokens of a Doc
    copy: bool = False       # a document read again (an upsampling pass or a later epoch), not new input


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


class DomainStream:
    """One domain's events: epochs x upsampling passes over its sources, in config order.

    The first pass's readers are made up front (generators: nothing is read until asked) and
    kept, so that once the mixture is over `unread` can count the records that pass never
    reached. The manifest accounts for every input record, read or not (records.py: nothing
    is dropped silently); passes after the first only make copies, so what they did not reach
    is no loss of input.
    """

    def __init__(self, domain: str, specs: dict[str, dict], chars_per_token: float, cfg: dict, dedup: Dedup | None):
        self.domain, self.specs, self.chars_per_token, self.cfg, self.dedup = domain, specs, chars_per_token, cfg, dedup
        self.first_readers = {name: sources_mod.read(name, spec) for name, spec in specs.items()}
        self._events = self._generate()

    def __iter__(self) -> Iterator[Event]:
        return self

    def __next__(self) -> Event:
        return next(self._events)

    def _generate(self) -> Iterator[Event]:
        factor = int(self.cfg["upsample"]["factor"])
        min_long = self.cfg["upsample"]["min_tokens"]
        domain, dedup = self.domain, self.dedup
        for epoch in range(int(self.cfg["max_epochs"])):
            for upsample_pass in range(factor):
                first = epoch == 0 and upsample_pass == 0
                if upsample_pass > 0 and min_long is None:
                    break
                readers = self.first_readers if first else {n: sources_mod.read(n, s) for n, s in self.specs.items()}
                ordinal = 0
                for name, reader in readers.items():
                    for record in reader:
                        if isinstance(record, Skip):
                            if first:  # bad records are counted once, not once per pass
                                yield Event(name, domain, record)
                            continue
                        ordinal += 1
                        est = len(record.text) / self.chars_per_token
                        if upsample_pass > 0 and est < min_long:
                            continue
                        if dedup is not None:
                            if first and not dedup.first_pass(record.text, domain, ordinal):
                                yield Event(name, domain, Skip("duplicate", record.ref, "exact duplicate of an earlier document"))
                                continue
                            if not first and (domain, ordinal) in dedup.duplicates:
                                continue
                        yield Event(name, domain, record, est, copy=not first)

    def unread(self) -> dict[str, int]:
        """Per source, the records (good or bad) of the first pass never reached; reads them to count."""
        return {
            name: sum(record.count if isinstance(record, Skip) else 1 for record in reader)
            for name, reader in self.first_readers.items()
        }


class Mixture:
    """The whole prep's stream of events, deterministic for a config (iterate it once).

    Once iterated to the end, `ended` says why the stream stopped and `unread()` counts what
    it left unread per source: a filled mixture share or `max_tokens` leaves documents behind
    that the manifest must still account for.
    """

    def __init__(self, by_domain: dict[str, dict[str, dict]], weights: dict[str, float],
                 chars_per_token: dict[str, float], cfg: dict):
        dedup = Dedup() if cfg["dedup"] else None
        self.streams = {d: DomainStream(d, specs, chars_per_token[d], cfg, dedup) for d, specs in by_domain.items()}
        self.weights, self.budget = weights, cfg["max_tokens"]
        self.ended: str | None = None

    def __iter__(self) -> Iterator[Event]:
        return self._mixed() if self.weights else self._in_order()

    def _over_budget(self, total: float) -> bool:
        if self.budget is not None and total >= self.budget:
            self.ended = f"max_tokens={self.budget} reached"
            return True
        return False

    def _in_order(self) -> Iterator[Event]:
        """No mixture: the domains one after another, in config order. The budget is checked
        before a record is pulled, so no record is read and then dropped uncounted."""
        total = 0.0
        for stream in self.streams.values():
            while not self._over_budget(total):
                event = next(stream, None)
                if event is None:
                    break
                total += event.est_tokens
                yield event
            if self.ended is not None:
                return
        self.ended = READ_TO_THE_END

    def _mixed(self) -> Iterator[Event]:
        """The next document comes from the domain furthest behind its share."""
        emitted = {d: 0.0 for d in self.weights}
        order = list(self.weights)
        total = 0.0
        while not self._over_budget(total):
            domain = min(order, key=lambda d: (emitted[d] / self.weights[d], order.index(d)))
            event = next(self.streams[domain], None)
            if event is None:  # going on would skew the proportions
                self.ended = f"domain '{domain}' ran out, and the mixture stops there to keep its proportions"
                return
            emitted[domain] += event.est_tokens
            total += event.est_tokens
            yield event

    def unread(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for stream in self.streams.values():
            counts.update(stream.unread())
        return counts


def mix(
    by_domain: dict[str, dict[str, dict]],
    weights: dict[str, float],
    chars_per_token: dict[str, float],
    cfg: dict,
) -> Mixture:
    """The whole prep's stream of events, deterministic for a config."""
    return Mixture(by_domain, weights, chars_per_token, cfg)
