"""RULER-style retrieval samples: every variant is answerable from its context, seeded."""

from __future__ import annotations

import random
import re

import pytest

from l2a_data_prep import synthetic

VARIANTS = {
    "single": dict(num_keys=1, num_values=1, num_queries=1),
    "multi_key": dict(num_keys=4, num_values=1, num_queries=1),
    "multi_value": dict(num_keys=1, num_values=3, num_queries=1),
    "multi_query": dict(num_keys=4, num_values=1, num_queries=2),
    "all": dict(num_keys=3, num_values=2, num_queries=3),
}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("types", [("words", "numbers", "noise"), ("uuids", "words", "words"), ("numbers", "uuids", "noise")])
def test_answers_are_exactly_the_needles_of_the_queried_keys(variant, types):
    key_type, value_type, haystack = types
    sizes = VARIANTS[variant]
    sample = synthetic.generate(random.Random(3), 3000, key_type=key_type, value_type=value_type, haystack=haystack, **sizes)
    needles = re.findall(r"One of the special magic \w+ for (\S+) is: (\S+)\.", sample.context)
    assert len(needles) == sizes["num_keys"] * sizes["num_values"]
    assert len({k for k, _ in needles}) == sizes["num_keys"]
    assert len(sample.keys) == sizes["num_queries"]
    assert sample.answers == [v for k in sample.keys for kk, v in needles if kk == k]
    assert all(k in sample.question for k in sample.keys)
    assert sample.document() == sample.prompt + sample.answer_text()
    assert sample.document().endswith(", ".join(sample.answers) + ".")
    assert abs(len(sample.prompt) - 3000) < 200
    assert len(sample.depths) == len(needles) and all(0 <= d <= 1 for d in sample.depths)


def test_seeded_and_length_in_any_unit():
    a = synthetic.generate(random.Random(5), 2000, num_keys=2, num_values=1, num_queries=1, key_type="words", value_type="numbers", haystack="words")
    b = synthetic.generate(random.Random(5), 2000, num_keys=2, num_values=1, num_queries=1, key_type="words", value_type="numbers", haystack="words")
    assert a == b
    words = lambda s: len(s.split())  # noqa: E731 - any counter works, e.g. a tokenizer's
    c = synthetic.generate(random.Random(5), 800, num_keys=1, num_values=1, num_queries=1, key_type="words", value_type="numbers", haystack="noise", count=words)
    assert abs(words(c.prompt) - 800) < 30


def test_training_stream_mixes_variants_and_is_order_independent():
    options = dict(length=[800, 1500], num_keys=[1, 4], num_values=[1, 3], num_queries=[1, 2],
                   key_type=["words", "uuids"], value_type=["numbers"], haystack=["noise", "words"])
    docs = [synthetic.training_document(0, i, options) for i in range(30)]
    assert docs[7] == synthetic.training_document(0, 7, options)  # document i does not depend on 0..i-1
    needle_counts = {len(re.findall("One of the special magic", d)) for d in docs}
    assert len(needle_counts) > 3
    assert synthetic.training_document(1, 7, options) != docs[7]


def test_bad_variant_is_refused():
    with pytest.raises(ValueError, match="num_queries <= num_keys"):
        synthetic.generate(random.Random(0), 100, num_keys=1, num_values=1, num_queries=2, key_type="words", value_type="numbers", haystack="noise")
    with pytest.raises(ValueError, match="haystack"):
        synthetic.generate(random.Random(0), 100, num_keys=1, num_values=1, num_queries=1, key_type="words", value_type="numbers", haystack="essay")
