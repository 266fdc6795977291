"""Synthetic retrieval documents, RULER-style (needle in a haystack), for training and evaluation.

A sample is a haystack of filler sentences with "needles" (`One of the special magic numbers
for <key> is: <value>.`) inserted at random depths, then a question about some of the keys.
Variants, as in RULER (Hsieh et al., 2024):

- single key: one needle, one query (`num_keys=1`; the classic passkey task);
- multi-key: `num_keys` needles with different keys, only `num_queries` of them asked
  (the others are distractors);
- multi-value: `num_values` needles share the queried key; every value must be returned;
- multi-query: `num_queries` keys asked at once, answers in the order asked.

Training uses `Sample.document()` (question followed by the answer); evaluation imports
`generate` and scores a model's continuation of `Sample.prompt` against `Sample.answers`.
Everything is a pure function of the `random.Random` passed in, so a seed reproduces a set.
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass, field
from typing import Callable

# RULER's "noise" haystack: repeated, content-free sentences.
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."

WORDS = (
    "amber anchor apple arrow aspen autumn badge bamboo banner basil beacon berry birch blossom "
    "bolt breeze bridge bronze bubble cabin cactus candle canyon carbon cargo castle cedar cherry "
    "cider cinder citrus clover cobalt comet copper coral cotton crater crystal dagger daisy delta "
    "desert diamond dolphin dragon drift eagle ember falcon feather fern fiddle flame flint forest "
    "fossil fountain garden garnet ginger glacier granite gravel harbor hazel helmet heron hollow "
    "honey horizon indigo island ivory jade jasmine jungle kettle kernel lagoon lantern lava lemon "
    "lilac linen lotus lunar maple marble meadow meteor mint mirror mist monsoon mosaic nectar "
    "nickel oasis ocean olive onyx orbit orchid otter paddle pebble pepper pillar pine planet "
    "plaza prism quartz quill rabbit radar raven reef ribbon ridge river rocket saddle saffron "
    "salmon sapphire scarlet shadow silver sparrow spice spruce stone summit sunset temple thistle "
    "thunder timber topaz tundra tulip valley velvet violet walnut willow winter zephyr"
).split()

NEEDLE = "One of the special magic {kind} for {key} is: {value}."
QUESTION = (
    "What are all the special magic {kind} for {keys} mentioned in the provided text? "
    "The special magic {kind} for {keys} mentioned in the provided text are"
)
INTRO = (
    "Some special magic {kind} are hidden within the following text. "
    "Make sure to memorize them. I will quiz you about the {kind} afterwards."
)
KINDS = {"numbers": "numbers", "words": "words", "uuids": "uuids"}


@dataclass
class Sample:
    context: str                       # intro, haystack and needles
    question: str                      # asked after the context; the answer continues it
    answers: list[str]                 # every expected value, in the order asked
    keys: list[str]                    # the queried keys
    depths: list[float] = field(default_factory=list)  # relative depth of each needle, 0..1

    @property
    def prompt(self) -> str:
        return f"{self.context}\n{self.question}"

    def answer_text(self) -> str:
        return " " + ", ".join(self.answers) + "."

    def document(self) -> str:
        """The training form: prompt followed by its answer."""
        return self.prompt + self.answer_text()


def _value(rng: random.Random, value_type: str) -> str:
    if value_type == "numbers":
        return str(rng.randrange(1_000_000, 10_000_000))
    if value_type == "words":
        return "-".join(rng.sample(WORDS, 2))
    if value_type == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    raise ValueError(f"value_type must be one of {sorted(KINDS)}, got '{value_type}'")


def _key(rng: random.Random, key_type: str) -> str:
    if key_type == "words":
        return "-".join(rng.sample(WORDS, 2))
    if key_type == "numbers":
        return str(rng.randrange(1_000_000, 10_000_000))
    if key_type == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    raise ValueError(f"key_type must be one of {sorted(KINDS)}, got '{key_type}'")


def haystack_sentences(rng: random.Random, haystack: str) -> Callable[[], str]:
    """The filler-sentence source of a haystack kind; public so that evaluation can measure how
    many tokens one filler sentence takes (the step by which `generate` grows a haystack)."""
    if haystack == "noise":
        return lambda: NOISE
    if haystack == "words":  # random word sentences: harder to skip than a fixed line
        return lambda: " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))).capitalize() + "."
    raise ValueError(f"haystack must be 'noise' or 'words', got '{haystack}'")


def generate(
    rng: random.Random,
    length: int,
    *,
    num_keys: int,
    num_values: int,
    num_queries: int,
    key_type: str,
    value_type: str,
    haystack: str,
    count: Callable[[str], int] = len,
) -> Sample:
    """One sample of about `length` units of `count` (characters by default; pass a token
    counter, e.g. `lambda s: len(tok.encode(s))`, for a length in tokens; it is applied per
    sentence, so the total is exact to within a few tokens).

    RULER's niah_single_1 is num_keys=num_values=num_queries=1, key_type="words",
    value_type="numbers", haystack="noise".
    """
    if not 1 <= num_queries <= num_keys:
        raise ValueError(f"need 1 <= num_queries <= num_keys, got {num_queries} and {num_keys}")
    if num_values < 1:
        raise ValueError(f"num_values must be >= 1, got {num_values}")
    if value_type not in KINDS:
        raise ValueError(f"value_type must be one of {sorted(KINDS)}, got '{value_type}'")
    kind = KINDS[value_type]
    keys: list[str] = []
    while len(keys) < num_keys:
        key = _key(rng, key_type)
        if key not in keys:
            keys.append(key)
    # Each key gets num_values needles (multi-value); distractor keys too, as in RULER.
    needles = [(key, _value(rng, value_type)) for key in keys for _ in range(num_values)]
    rng.shuffle(needles)
    intro = INTRO.format(kind=kind)
    queried = keys[:num_queries]
    question = QUESTION.format(kind=kind, keys=", ".join(queried))
    needle_texts = [NEEDLE.format(kind=kind, key=k, value=v) for k, v in needles]
    budget = length - count(intro) - count(question) - sum(count(t) for t in needle_texts) - 8 * num_queries
    sentence = haystack_sentences(rng, haystack)
    filler: list[str] = []
    used = 0
    while used < budget:
        text = sentence()
        filler.append(text)
        used += count(" " + text)
    # Sorted insertion slots keep the needles' relative order random but their depths spread.
    slots = sorted(rng.randint(0, len(filler)) for _ in needles)
    pieces, depths, start = [intro], [], 0
    for slot, text in zip(slots, needle_texts):
        pieces.extend(filler[start:slot])
        pieces.append(text)
        depths.append(slot / max(1, len(filler)))
        start = slot
    pieces.extend(filler[start:])
    answers = [v for k in queried for kk, v in needles if kk == k]
    return Sample(context=" ".join(pieces), question=question, answers=answers, keys=queried, depths=depths)


def training_document(seed: int, index: int, options: dict) -> str:
    """Document `index` of a seeded training stream: variant sizes drawn from `options` ranges.

    `options` holds length (characters) / num_keys / num_values / num_queries as [low, high]
    (inclusive) and key_type / value_type / haystack as lists to choose from, so one stream
    mixes all variants (the prep config's `source_defaults.retrieval`).
    """
    rng = random.Random(f"{seed}:{index}")  # per-document seed: independent of read order
    length = rng.randint(*options["length"])
    num_keys = rng.randint(*options["num_keys"])
    num_queries = rng.randint(1, min(num_keys, options["num_queries"][1]))
    return generate(
        rng,
        length,
        num_keys=num_keys,
        num_values=rng.randint(*options["num_values"]),
        num_queries=num_queries,
        key_type=rng.choice(list(options["key_type"])),
        value_type=rng.choice(list(options["value_type"])),
        haystack=rng.choice(list(options["haystack"])),
    ).document()
