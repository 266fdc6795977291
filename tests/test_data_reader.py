"""l2a_train.data: position ids from boundaries, deterministic order, disjoint ranks, exact
resume at another world size, clear errors."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from l2a_common import UserError, compose
from l2a_data_prep import tokenizer
from l2a_data_prep.pipeline import prepare
from l2a_train.data import PackedDataset, PackedLoader, position_ids

WORDS = "red green blue cyan magenta yellow black white orange purple".split()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reader")
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 90))) for _ in range(150)]
    tok = tokenizer.train_builtin(texts[:50], 300, str(tmp / "tok"))
    (tmp / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    cfg = OmegaConf.to_container(compose("prep", [f"output={tmp / 'data'}"]), resolve=True)
    cfg.update(sources={"a": {"type": "jsonl", "path": str(tmp / "a.jsonl")}}, mixture=[], max_tokens=None)
    cfg.update(progress=False, seq_len=48)
    cfg["tokenizer"].update(path=tok, estimate_chars=5000)
    cfg["shards"]["tokens"] = 700
    manifest = prepare(cfg)
    assert manifest["num_rows"] >= 60 and len(manifest["shards"]) >= 3
    return tmp / "data"


def loader(ds, B, rank, world, seed=7, shuffle=True):
    return PackedLoader(ds, micro_batch_size=B, rank=rank, world_size=world, seed=seed, shuffle=shuffle)


def row_ids(ds, batch) -> list[int]:
    """Which rows a batch holds (rows are distinct in this data set)."""
    lookup = {tuple(ds.row(i)[0].tolist()): i for i in range(ds.num_rows)}
    assert len(lookup) == ds.num_rows
    return [lookup[tuple(r)] for r in batch["input_ids"].tolist()]


def test_position_ids_restart_at_each_document(data_dir):
    ds = PackedDataset(data_dir)
    eos = ds.manifest["tokenizer"]["eos_token_id"]
    batch = loader(ds, 8, 0, 1).next_batch()
    ids, pos = batch["input_ids"], batch["position_ids"]
    assert ids.dtype == pos.dtype == torch.long and ids.shape == pos.shape == (8, ds.seq_len)
    restarts = 0
    for r in range(8):
        assert pos[r, 0] == 0  # a row starts a document or continues one as a new segment
        for t in range(1, ds.seq_len):
            if ids[r, t - 1] == eos:  # a document ended: the next token starts a new one
                assert pos[r, t] == 0
                restarts += 1
            else:  # inside a document positions count up
                assert pos[r, t] == pos[r, t - 1] + 1
    assert restarts >= 4  # the check above did see documents start mid-row
    assert position_ids(np.array([0, 3, 4]), 7).tolist() == [0, 1, 2, 0, 0, 1, 2]


def test_order_is_deterministic_per_seed_and_epoch(data_dir):
    ds = PackedDataset(data_dir)
    n = ds.num_rows
    a = [row_ids(ds, loader(ds, n, 0, 1).next_batch())]
    b = [row_ids(ds, loader(ds, n, 0, 1).next_batch())]
    assert a == b and sorted(a[0]) == list(range(n))  # one epoch visits every row once
    assert row_ids(ds, loader(ds, n, 0, 1, seed=8).next_batch()) != a[0]
    two = loader(ds, n, 0, 1)
    first, second = row_ids(ds, two.next_batch()), row_ids(ds, two.next_batch())
    assert sorted(second) == list(range(n)) and second != first and two.epoch == 2
    assert row_ids(ds, loader(ds, n, 0, 1, shuffle=False).next_batch()) == list(range(n))


def test_ranks_get_disjoint_rows_covering_the_epoch(data_dir):
    ds = PackedDataset(data_dir)
    world, B = 3, 2
    steps = ds.num_rows // (world * B)
    seen = []
    loaders = [loader(ds, B, r, world) for r in range(world)]
    for _ in range(steps):
        for lo in loaders:
            seen.extend(row_ids(ds, lo.next_batch()))
    assert len(seen) == len(set(seen)) == steps * world * B
    reference = row_ids(ds, loader(ds, steps * world * B, 0, 1).next_batch())
    assert seen == reference  # rank r's rows are the r-th slice of each global step


def test_resume_is_exact_at_another_world_size(data_dir):
    ds = PackedDataset(data_dir)
    total = 2 * ds.num_rows + 5  # crosses epoch boundaries
    reference = row_ids(ds, loader(ds, total, 0, 1).next_batch())
    consumed = []
    old = [loader(ds, 3, r, 2) for r in range(2)]
    for _ in range(9):
        for lo in old:
            consumed.extend(row_ids(ds, lo.next_batch()))
    state = old[0].state_dict()
    assert state == old[1].state_dict() and state["rows_consumed"] == 54
    new = [loader(ds, 2, r, 4) for r in range(4)]
    for lo in new:
        lo.load_state_dict(json.loads(json.dumps(state)))  # survives a round trip through a checkpoint
    while len(consumed) < total - 8:
        for lo in new:
            consumed.extend(row_ids(ds, lo.next_batch()))
    assert consumed == reference[: len(consumed)]


def test_state_from_another_data_set_or_seed_is_refused(data_dir):
    ds = PackedDataset(data_dir)
    lo = loader(ds, 2, 0, 1)
    lo.next_batch()
    state = lo.state_dict()
    with pytest.raises(UserError, match="seed: checkpoint 7, now 8"):
        loader(ds, 2, 0, 1, seed=8).load_state_dict(state)
    with pytest.raises(UserError, match="num_rows"):
        loader(ds, 2, 0, 1).load_state_dict({**state, "num_rows": 3})


def test_dataset_errors_name_the_path(tmp_path, data_dir):
    with pytest.raises(UserError, match=f"data.path='{tmp_path}': no manifest.json.*l2a-prep"):
        PackedDataset(tmp_path)
    with pytest.raises(UserError, match="data.seq_len=64 but .* rows of 48 tokens"):
        PackedDataset(data_dir, seq_len=64)
    ds = PackedDataset(data_dir, seq_len=48)
    assert ds.tokenizer_path == str(data_dir / "tokenizer") and ds.manifest["format"] == "l2a-packed-v1"
    with pytest.raises(UserError, match="rank < world_size"):
        loader(ds, 2, 2, 2)


def test_truncated_shard_is_reported(tmp_path, data_dir):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(data_dir, copy)
    shard = copy / "shard-00001.tokens.bin"
    shard.write_bytes(shard.read_bytes()[:-4])
    ds = PackedDataset(copy)
    start = ds.manifest["shards"][0]["rows"]
    with pytest.raises(UserError, match="shard-00001.tokens.bin: .* bytes, expected"):
        ds.row(start)
