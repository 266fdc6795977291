"""Checkpointer logic without DeepSpeed: atomic commit, `latest` written last, keep_last,
leftovers of a killed save, resolving user paths, when a universal conversion is needed."""

import json
import random

import pytest
import torch

from l2a_common import UserError
from l2a_train.training import checkpoints as ck
from l2a_train.training import faults
from l2a_train.training.distributed import world


class FakeEngine:
    """Writes what DeepSpeed would, or dies halfway (raise) like a killed process."""

    def __init__(self, fail=False):
        self.fail = fail

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        assert not save_latest  # we write `latest` ourselves, last
        folder = ck.Path(save_dir) / tag
        folder.mkdir(parents=True)
        (folder / "mp_rank_00_model_states.pt").write_bytes(b"weights")
        if self.fail:
            raise KeyboardInterrupt("killed while writing")


def save(cp, step, engine=None):
    return cp.save(engine or FakeEngine(), step, {"step": step, "world_size": 1, "zero_stage": 2}, {"data": {"rows": step}})


def test_save_commits_atomically_and_keeps_last(tmp_path):
    cp = ck.Checkpointer(tmp_path, keep_last=2, env=world())
    for step in (10, 20, 30):
        path = save(cp, step)
        assert path.name == ck.tag_for(step) and (path / ck.STATE_FILE).is_file()
        assert (tmp_path / "checkpoints" / "latest").read_text().strip() == path.name
    assert [p.name for p in ck.complete_checkpoints(cp.dir)] == ["step_00000020", "step_00000030"]
    state = ck.read_state(cp.latest())
    assert state["format"] == ck.STATE_FORMAT and state["step"] == 30
    rank = torch.load(cp.latest() / "rank_00000.pt", weights_only=False)
    assert rank["data"] == {"rows": 30} and set(rank["rng"]) >= {"python", "numpy", "torch"}
    assert save(cp, 30) == cp.latest()  # saving a step again is a no-op


def test_a_killed_save_leaves_the_previous_checkpoint(tmp_path):
    cp = ck.Checkpointer(tmp_path, keep_last=3, env=world())
    save(cp, 1)
    with pytest.raises(KeyboardInterrupt):
        save(cp, 2, FakeEngine(fail=True))
    assert (cp.dir / ".tmp-step_00000002").is_dir()
    assert cp.latest().name == "step_00000001"
    assert (cp.dir / "latest").read_text().strip() == "step_00000001"
    save(cp, 2)  # the retry replaces the leftover
    assert cp.latest().name == "step_00000002" and not list(cp.dir.glob(".tmp-*"))


def test_folder_without_state_is_not_complete(tmp_path):
    (tmp_path / "checkpoints" / "step_00000009").mkdir(parents=True)  # renamed? never: no trainer_state.json
    assert ck.Checkpointer(tmp_path, 1, world()).latest() is None


def test_resolve_checkpoint_paths(tmp_path):
    cp = ck.Checkpointer(tmp_path / "run", keep_last=2, env=world())
    save(cp, 5)
    last = save(cp, 7)
    for given in (last, cp.dir, tmp_path / "run"):
        assert ck.resolve_checkpoint(given, "trainer.resume") == last
    with pytest.raises(UserError, match="trainer.resume=.*no complete checkpoint"):
        ck.resolve_checkpoint(tmp_path / "empty", "trainer.resume")


@pytest.mark.parametrize(
    "saved, now, weights_only, plan",
    [((1, 2), (1, 2), False, "direct"), ((2, 2), (1, 2), False, "universal"), ((8, 3), (4, 3), False, "universal"),
     ((2, 0), (4, 0), False, "direct"), ((2, 3), (2, 2), False, "unsupported"), ((2, 2), (2, 3), False, "unsupported"),
     ((2, 2), (1, 0), True, "direct"), ((2, 3), (2, 3), True, "direct"), ((2, 3), (1, 3), True, "unsupported"),
     ((1, 2), (1, 3), True, "unsupported")],
)
def test_load_plan(saved, now, weights_only, plan):
    state = {"world_size": saved[0], "zero_stage": saved[1]}
    assert ck.load_plan(state, *now, weights_only=weights_only) == plan


def test_rng_round_trip():
    ck.seed_everything(3)
    state = ck.rng_state()
    a = (random.random(), torch.rand(2))
    ck.set_rng_state(state)
    b = (random.random(), torch.rand(2))
    assert a[0] == b[0] and torch.equal(a[1], b[1])


def test_fault_spec(monkeypatch):
    monkeypatch.setenv("L2A_FAULT", "nan_at:2,4;kill_in_save:1")
    assert faults.fault_steps("nan_at") == {2, 4} and faults.fault_steps("kill_in_save") == {1}
    assert faults.fault_steps("sigterm_at") == set()
    json.dumps(faults.fault_steps("nan_at"), default=list)


def test_mapped_loads_map_zip_files_and_restore_the_engine(tmp_path, monkeypatch):
    """Loading a checkpoint maps zip-format files (tensors equal, backed by the file) and still reads
    a legacy-format file; the DeepSpeed checkpoint engine gets its own load back afterwards."""
    from types import SimpleNamespace

    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    state = {"module": {"w": torch.arange(6.0).view(2, 3)}, "step": 3}
    torch.save(state, tmp_path / "zip.pt")
    torch.save(state, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    engine = SimpleNamespace(checkpoint_engine=TorchCheckpointEngine())
    calls, load = [], torch.load
    monkeypatch.setattr(torch, "load", lambda path, **kw: calls.append((ck.Path(path).name, kw.get("mmap"))) or load(path, **kw))
    with ck.mapped_loads(engine):
        mapped = engine.checkpoint_engine.load(str(tmp_path / "zip.pt"), map_location=torch.device("cpu"))
        legacy = engine.checkpoint_engine.load(str(tmp_path / "legacy.pt"), map_location=torch.device("cpu"))
    for got in (mapped, legacy):
        assert got["step"] == 3 and torch.equal(got["module"]["w"], state["module"]["w"])
    assert calls == [("zip.pt", True), ("legacy.pt", None)]  # mapped; read whole (mmap needs the zip format)
    assert "load" not in vars(engine.checkpoint_engine)  # the class's own method again


def test_mapped_loads_leave_no_optimizer_state_backed_by_the_file(tmp_path):
    """A CPU optimizer's state loaded from a mapped file (torch keeps a tensor whose device and
    dtype match as it is) is copied when the load ends: the Adam moments must not keep a
    checkpoint file mapped (its disk space would not come back when the checkpoint is pruned)."""
    from types import SimpleNamespace

    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    weight = torch.nn.Parameter(torch.ones(4, 4))
    optimizer = torch.optim.AdamW([weight])
    weight.grad = torch.full_like(weight, 0.5)
    optimizer.step()
    torch.save(optimizer.state_dict(), tmp_path / "optim.pt")
    engine = SimpleNamespace(checkpoint_engine=TorchCheckpointEngine(), optimizer=SimpleNamespace(optimizer=optimizer))
    with ck.mapped_loads(engine):
        loaded = engine.checkpoint_engine.load(str(tmp_path / "optim.pt"), map_location=torch.device("cpu"))
        optimizer.load_state_dict(loaded)
        assert optimizer.state[weight]["exp_avg"] is loaded["state"][0]["exp_avg"]  # what torch does
    state = optimizer.state[weight]
    for name in ("exp_avg", "exp_avg_sq"):
        assert state[name].data_ptr() != loaded["state"][0][name].data_ptr()
        assert torch.equal(state[name], loaded["state"][0][name])
