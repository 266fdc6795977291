"""Bad input never disappears silently: counted by reason (manifest + console) or, with
strict=true, an error naming the file and line."""

from __future__ import annotations

import gzip
import json
import logging
import random

import pytest
from omegaconf import OmegaConf

from l2a_common import UserError, compose
from l2a_data_prep import tokenizer
from l2a_data_prep.pipeline import prepare

GOOD = ["good one alpha beta", "good two gamma delta", "good three epsilon"]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    rng = random.Random(0)
    words = "alpha beta gamma delta epsilon good one two three".split()
    texts = [" ".join(rng.choice(words) for _ in range(40)) for _ in range(100)]
    return tokenizer.train_builtin(texts, 300, str(tmp_path_factory.mktemp("tok")))


def make_config(out, tok, sources, **top) -> dict:
    cfg = OmegaConf.to_container(compose("prep", [f"output={out}"]), resolve=True)
    cfg.update(sources=sources, mixture=[], max_tokens=None, progress=False, seq_len=32)
    cfg.update(top)
    cfg["tokenizer"]["path"] = tok
    cfg["tokenizer"]["estimate_chars"] = 5000
    return cfg


def bad_jsonl(path):
    lines = [
        json.dumps({"text": GOOD[0]}).encode(),            # 1 ok
        b'{"text": "unterminated',                          # 2 malformed_json
        b"[1, 2, 3]",                                       # 3 malformed_json (not an object)
        json.dumps({"body": "wrong field"}).encode(),       # 4 missing_text_field
        json.dumps({"text": None}).encode(),                # 5 missing_text_field
        json.dumps({"text": 42}).encode(),                  # 6 text_not_string
        json.dumps({"text": "  \n "}).encode(),             # 7 empty_document
        b'{"text": "caf\xe9 latin-1"}',                     # 8 invalid_utf8
        b'{"text": "lone \\udc80 surrogate"}',              # 9 invalid_utf8
        b"",                                                # 10 empty_document (blank line)
        json.dumps({"text": GOOD[1]}).encode(),             # 11 ok
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


EXPECTED = {
    "malformed_json": 2,
    "missing_text_field": 2,
    "text_not_string": 1,
    "empty_document": 2,
    "invalid_utf8": 2,
}


def test_bad_records_are_counted_by_reason_with_file_and_line(tmp_path, tok_dir, caplog):
    path = bad_jsonl(tmp_path / "bad.jsonl")
    with caplog.at_level(logging.WARNING, logger="l2a_data_prep"):
        manifest = prepare(make_config(tmp_path / "out", tok_dir, {"web": {"type": "jsonl", "path": str(path)}}))
    assert manifest["skipped"] == EXPECTED
    assert manifest["sources"]["web"]["skipped"] == EXPECTED
    assert manifest["documents"] == 2
    examples = manifest["skipped_examples"]
    assert examples["malformed_json"][0].startswith(f"{path}:2: invalid JSON")
    assert examples["missing_text_field"][0].startswith(f"{path}:4:")
    assert examples["invalid_utf8"] == [
        f"{path}:8: byte 13 of the line is not UTF-8",
        f"{path}:9: text holds an unpaired surrogate at character 5",
    ]
    console = caplog.text
    for line in (2, 3, 4, 5, 6, 7, 8, 9, 10):
        assert f"{path}:{line}" in console


@pytest.mark.parametrize(
    "line,reason",
    [(2, "malformed_json"), (4, "missing_text_field"), (6, "text_not_string"), (7, "empty_document"), (8, "invalid_utf8")],
)
def test_strict_stops_at_the_first_bad_record(tmp_path, tok_dir, line, reason):
    lines = bad_jsonl(tmp_path / "bad.jsonl").read_bytes().split(b"\n")
    path = tmp_path / "one_bad.jsonl"
    path.write_bytes(b"\n".join([lines[0], lines[line - 1], lines[10]]) + b"\n")  # the bad one is line 2
    with pytest.raises(UserError) as err:
        prepare(make_config(tmp_path / "out", tok_dir, {"web": {"type": "jsonl", "path": str(path)}}, strict=True))
    message = str(err.value)
    assert message.startswith(f"{path}:2: ") and f"({reason}, source 'web')" in message and "strict=true" in message
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_unreadable_files_are_counted_and_good_records_before_the_damage_kept(tmp_path, tok_dir):
    rng = random.Random(1)
    data = "".join(json.dumps({"text": f"{GOOD[0]} {rng.random()}"}) + "\n" for _ in range(400)).encode()
    packed = gzip.compress(data)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a_truncated.jsonl.gz").write_bytes(packed[: len(packed) // 2])
    ok = b"".join(data.splitlines(keepends=True)[:5])
    (tmp_path / "in" / "b_ok.jsonl").write_bytes(ok)
    (tmp_path / "in" / "c_broken_link.jsonl").symlink_to(tmp_path / "gone.jsonl")
    manifest = prepare(make_config(tmp_path / "out", tok_dir, {"web": {"type": "jsonl", "path": str(tmp_path / "in")}}))
    assert manifest["skipped"] == {"unreadable_file": 2}
    truncated, broken = manifest["skipped_examples"]["unreadable_file"]
    assert "a_truncated.jsonl.gz:" in truncated and "c_broken_link.jsonl" in broken
    assert manifest["documents"] > 5  # what the truncated file held before the damage is kept
    with pytest.raises(UserError, match="a_truncated.jsonl.gz:.*unreadable_file"):
        prepare(make_config(tmp_path / "o2", tok_dir, {"web": {"type": "jsonl", "path": str(tmp_path / "in")}}, strict=True))


def test_text_folder_invalid_utf8_and_empty_files(tmp_path, tok_dir):
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "a.txt").write_text(GOOD[0])
    (tmp_path / "t" / "b.txt").write_bytes(b"line one\nline two \xff\xfe\n")
    (tmp_path / "t" / "c.txt").write_text("   \n")
    manifest = prepare(make_config(tmp_path / "out", tok_dir, {"docs": {"type": "text", "path": str(tmp_path / "t")}}))
    assert manifest["skipped"] == {"empty_document": 1, "invalid_utf8": 1}
    assert manifest["skipped_examples"]["invalid_utf8"] == [f"{tmp_path / 't' / 'b.txt'}:2: byte 18 is not UTF-8"]
    assert manifest["documents"] == 1


def test_parquet_nulls_and_wrong_column(tmp_path, tok_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [GOOD[0], None, "", GOOD[1]]}), tmp_path / "a.parquet")
    manifest = prepare(make_config(tmp_path / "out", tok_dir, {"p": {"type": "parquet", "path": str(tmp_path / "a.parquet")}}))
    assert manifest["skipped"] == {"missing_text_field": 1, "empty_document": 1}
    assert manifest["skipped_examples"]["missing_text_field"][0].startswith(f"{tmp_path / 'a.parquet'}#row1")
    with pytest.raises(UserError, match=r"a.parquet: no column 'body' \(columns: text\); set sources.p.text_field"):
        prepare(
            make_config(tmp_path / "o2", tok_dir, {"p": {"type": "parquet", "path": str(tmp_path / "a.parquet"), "text_field": "body"}})
        )


def test_configuration_errors_name_the_setting(tmp_path, tok_dir):
    src = tmp_path / "a.jsonl"
    src.write_text(json.dumps({"text": GOOD[0]}) + "\n")
    ok = {"a": {"type": "jsonl", "path": str(src)}}
    with pytest.raises(UserError, match=r"tokenizer.path='/no/such/tokenizer' does not exist"):
        prepare(make_config(tmp_path / "o", "/no/such/tokenizer", ok))
    (tmp_path / "empty_tok").mkdir()
    with pytest.raises(UserError, match=r"tokenizer.path='.*empty_tok': cannot load"):
        prepare(make_config(tmp_path / "o", str(tmp_path / "empty_tok"), ok))
    with pytest.raises(UserError, match=r"sources.a.path: '/no/such/file.jsonl' does not exist"):
        prepare(make_config(tmp_path / "o", tok_dir, {"a": {"type": "jsonl", "path": "/no/such/file.jsonl"}}))
    with pytest.raises(UserError, match=r"sources.a.type must be one of"):
        prepare(make_config(tmp_path / "o", tok_dir, {"a": {"type": "csv", "path": str(src)}}))
    with pytest.raises(UserError, match=r"sources.a.path: no .* files match"):
        (tmp_path / "nothing").mkdir()
        prepare(make_config(tmp_path / "o", tok_dir, {"a": {"type": "jsonl", "path": str(tmp_path / "nothing")}}))
    with pytest.raises(UserError, match="no sources"):
        prepare(make_config(tmp_path / "o", tok_dir, {}))
    with pytest.raises(UserError, match="seq_len must be"):
        prepare(make_config(tmp_path / "o", tok_dir, ok, seq_len=1))
    inside = make_config(tmp_path / "data", None, ok)  # the built-in tokenizer, cached inside the output
    inside["tokenizer"]["train"]["cache_dir"] = str(tmp_path / "data" / "tokenizers")
    with pytest.raises(UserError, match=r"tokenizer.train.cache_dir=.* lies inside output"):
        prepare(inside)
    assert not (tmp_path / "data").exists()  # found before anything was written


def test_nothing_usable_is_an_error_not_an_empty_data_set(tmp_path, tok_dir):
    src = tmp_path / "a.jsonl"
    src.write_text('{"text": ""}\n{"oops"\n')
    with pytest.raises(UserError, match=r"no documents.*malformed_json: 1, empty_document: 1"):
        prepare(make_config(tmp_path / "o", tok_dir, {"a": {"type": "jsonl", "path": str(src)}}))


def test_empty_input_is_an_error(tmp_path, tok_dir):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(UserError, match=r"no documents left to pack from the sources \(skipped none\)"):
        prepare(make_config(tmp_path / "o", tok_dir, {"a": {"type": "jsonl", "path": str(tmp_path / "empty.jsonl")}}))
