"""What sources yield (documents and skipped records) and the bad-input policy.

Readers never drop a record silently: a bad record becomes a `Skip` with a reason and a
reference (file and line, or file and row). `BadInputPolicy` turns it into an error naming
the record when `strict=true`, else counts it; the counts go to the manifest and the console.
Records the stream never reaches (a filled mixture share, `max_tokens`) are counted too, as
left unread (`l2a_data_prep.mixture`), so the manifest accounts for every input record.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

from l2a_common import UserError

log = logging.getLogger("l2a_data_prep")

# Every reason a record can be skipped for; the manifest lists counts under these names.
REASONS = (
    "malformed_json",      # a JSONL line that does not parse, or is not a JSON object
    "missing_text_field",  # the record has no text field, or it is null
    "text_not_string",     # the text field holds a number, list, ...
    "empty_document",      # nothing but whitespace
    "invalid_utf8",        # bytes that are not UTF-8
    "unreadable_file",     # a file that cannot be opened or read to the end (e.g. truncated .gz)
    "too_short",           # fewer tokens than filters.min_doc_tokens
    "too_long",            # more tokens than filters.max_doc_tokens
    "duplicate",           # exact duplicate of an earlier document (dedup=true)
)
BAD_INPUT = REASONS[:6]  # what strict=true stops at; the rest are drops by design
# The setting to look at when a source loses its records to a reason ({source}: the source's name).
SETTING_TO_CHECK = {
    "malformed_json": "sources.{source}.path (the files are not JSON Lines)",
    "missing_text_field": "sources.{source}.text_field",
    "text_not_string": "sources.{source}.text_field",
    "empty_document": "sources.{source}.path (the documents are empty)",
    "invalid_utf8": "sources.{source}.path (the files are not UTF-8 text)",
    "unreadable_file": "sources.{source}.path (the files cannot be read)",
    "too_short": "filters.min_doc_tokens",
    "too_long": "filters.max_doc_tokens",
    "duplicate": "dedup",
}
EXAMPLES_KEPT = 5  # per reason, in the manifest and on the console


@dataclass
class Doc:
    text: str
    ref: str        # where it came from, for messages: "file.jsonl:12", "stdlib:asyncio"


@dataclass
class Skip:
    reason: str
    ref: str
    detail: str
    count: int = 1  # a whole unreadable file may stand for several records


class SkipCounter:
    """Counts skips per source and reason, keeps a few examples, and applies `strict`.

    `strict` only concerns bad input (`BAD_INPUT`): filtered, too short or duplicate
    documents are dropped by design and always just counted.
    """

    def __init__(self, strict: bool, announce: bool):
        self.strict, self.announce = strict, announce
        self.counts: dict[str, Counter[str]] = {}
        self.examples: dict[str, list[str]] = {}

    def add(self, skip: Skip, source: str) -> None:
        if self.strict and skip.reason in BAD_INPUT:
            raise UserError(
                f"{skip.ref}: {skip.detail} ({skip.reason}, source '{source}'); strict=true stops at the "
                "first bad record: fix the input, or set strict=false to skip and count such records"
            )
        self.counts.setdefault(source, Counter())[skip.reason] += skip.count
        examples = self.examples.setdefault(skip.reason, [])
        if len(examples) < EXAMPLES_KEPT:
            examples.append(f"{skip.ref}: {skip.detail}")
            if self.announce:
                log.warning("skipped (%s) %s: %s", skip.reason, skip.ref, skip.detail)

    def merge(self, other: dict) -> None:
        """Add the counts and examples of another counter's `as_dict` (a shard marker's)."""
        for source, counts in other["by_source"].items():
            self.counts.setdefault(source, Counter()).update(counts)
        for reason, items in other["examples"].items():
            kept = self.examples.setdefault(reason, [])
            kept.extend(items[: EXAMPLES_KEPT - len(kept)])

    def totals(self) -> dict[str, int]:
        total: Counter[str] = Counter()
        for counts in self.counts.values():
            total.update(counts)
        return {reason: total[reason] for reason in REASONS if total[reason]}

    def as_dict(self) -> dict:
        return {
            "by_source": {s: {r: c[r] for r in REASONS if c[r]} for s, c in sorted(self.counts.items())},
            "examples": {r: self.examples[r] for r in REASONS if r in self.examples},
        }
