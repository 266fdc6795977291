"""Checkpoints: DeepSpeed state plus everything else a run needs to continue exactly.

Layout of a run directory's `checkpoints/`:

    step_00000040/                 one complete checkpoint (a DeepSpeed tag)
        mp_rank_00_model_states.pt, zero_pp_rank_*_optim_states.pt, ...   (DeepSpeed)
        rank_00000.pt              per rank: RNG states (python, numpy, torch, CUDA), data reader state
        trainer_state.json         step, tokens seen, bad steps, wandb run id, world size, ZeRO stage
    latest                         the newest complete tag (DeepSpeed's own pointer format)

Atomicity: every rank writes into `.tmp-step_00000040/`; after a barrier rank 0 writes
`trainer_state.json`, renames the folder to `step_00000040` (one atomic rename) and only then
rewrites `latest` (temp file + rename). A kill at any moment leaves the previous checkpoint
untouched; leftovers named `.tmp-*` are never loaded and are removed by the next save.

Resume picks the newest complete `step_*` folder. A different world size with ZeRO stage >= 1
goes through a DeepSpeed universal checkpoint (converted once into this run's checkpoints/) or
stops with a clear message (`trainer.universal_checkpoint=false`); a different ZeRO stage stops
with a clear message (the weights alone carry over through the Hugging Face export, `hf/`).
The scheduler has no state: the learning rate and lambda are functions of the step (`schedules.py`).

Loading maps the files into memory (`mapped_loads`) instead of reading them whole: DeepSpeed reads
the model-states file twice (once to check its parallel layout), and a mapped file costs only its
pickle the first time and is copied once, straight into the parameters, the second.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import subprocess
import sys
import time
import zipfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from l2a_common import UserError

from ..atomic import fsync_dir, write_atomic
from . import distributed as dist_utils

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
LATEST = "latest"
TAG_RE = re.compile(r"^step_(\d{8})$")
TMP_PREFIX = ".tmp-"
UNIVERSAL_SUFFIX = "-universal"
STATE_FORMAT = "l2a-trainer-state-v1"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a folder named step_N holding trainer_state.json)."""
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if p.is_dir() and TAG_RE.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(TAG_RE.match(p.name).group(1)))


def read_state(path: Path) -> dict:
    return json.loads((Path(path) / STATE_FILE).read_text())


def resolve_checkpoint(path: str | Path, setting: str) -> Path:
    """A checkpoint folder from a user path: a step_N folder, a checkpoints/ folder or a run directory."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path
    for candidate in (path / "checkpoints", path):
        found = complete_checkpoints(candidate)
        if found:
            return found[-1]
    raise UserError(f"{setting}={path}: no complete checkpoint there (expected a step_N folder with {STATE_FILE}, "
                    "a checkpoints/ folder or a run directory)")


# ---------------------------------------------------------------------------------------------
# RNG and per-rank state


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------


class Checkpointer:
    """Saves and loads complete checkpoints of one run directory (all ranks call every method)."""

    def __init__(self, run_dir: Path, keep_last: int, env: dist_utils.DistEnv):
        self.dir = Path(run_dir) / "checkpoints"
        self.keep_last = max(1, int(keep_last))
        self.env = env

    # -- finding ----------------------------------------------------------------------------
    def latest(self) -> Path | None:
        found = complete_checkpoints(self.dir)
        return found[-1] if found else None

    # -- saving -----------------------------------------------------------------------------
    def save(self, engine, step: int, state: dict, rank_state: dict) -> Path:
        """Write a complete checkpoint for `step`; `state` goes to trainer_state.json (rank 0's),
        `rank_state` (RNG, data reader) to this rank's file."""
        tag = tag_for(step)
        final = self.dir / tag
        if final.is_dir() and (final / STATE_FILE).is_file():
            return final  # already saved (for example a signal right after a resume)
        tmp = self.dir / f"{TMP_PREFIX}{tag}"
        if self.env.is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # a previous attempt that was killed
        dist_utils.barrier()
        started = time.time()
        self.write(engine, tmp, rank_state)
        self.commit(tmp, final, state)
        if self.env.is_main:
            log.info("saved checkpoint %s (%.1f s)", final, time.time() - started)
        return final

    def write(self, engine, tmp: Path, rank_state: dict) -> None:
        """Every rank: DeepSpeed's files and this rank's state, into the temporary folder."""
        engine.save_checkpoint(str(self.dir), tag=tmp.name, client_state={}, save_latest=False)
        torch.save({**rank_state, "rng": rng_state()}, tmp / f"rank_{self.env.rank:05d}.pt")

    def commit(self, tmp: Path, final: Path, state: dict) -> None:
        """After all ranks wrote: rank 0 adds trainer_state.json, renames the folder, then `latest`."""
        dist_utils.barrier()
        if self.env.is_main:
            write_atomic(tmp / STATE_FILE, json.dumps({"format": STATE_FORMAT, **state}, indent=2) + "\n")
            os.rename(tmp, final)  # the commit: the folder appears complete or not at all
            fsync_dir(self.dir)
            write_atomic(self.dir / LATEST, final.name + "\n")  # written last
            self._prune()
        dist_utils.barrier()

    def _prune(self) -> None:
        complete = complete_checkpoints(self.dir)
        for old in complete[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
            shutil.rmtree(old.with_name(old.name + UNIVERSAL_SUFFIX), ignore_errors=True)
        for stale in self.dir.glob(f"{TMP_PREFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)

    # -- loading ----------------------------------------------------------------------------
    def universal_path(self, path: Path) -> Path:
        """Where the universal conversion of checkpoint `path` goes: this run's checkpoints/."""
        return self.dir / f"{path.name}{UNIVERSAL_SUFFIX}"

    def load(self, engine, path: Path, universal: bool = False) -> tuple[dict, dict]:
        """Load model + optimizer from `path` (its universal conversion if `universal`); returns
        (trainer state, this rank's state: RNG and data reader)."""
        state = read_state(path)
        if state.get("format") != STATE_FORMAT:
            raise UserError(f"{path}/{STATE_FILE}: unknown format {state.get('format')!r}")
        source = self.universal_path(path) if universal else path
        with mapped_loads(engine):
            loaded, _ = engine.load_checkpoint(str(source.parent), tag=source.name, load_optimizer_states=True,
                                               load_lr_scheduler_states=False)
        if loaded is None:
            raise UserError(f"{path}: DeepSpeed could not load this checkpoint")
        same_world = int(state.get("world_size", -1)) == self.env.world_size
        rank_file = path / f"rank_{self.env.rank if same_world else 0:05d}.pt"
        rank_state = torch.load(rank_file, map_location="cpu", weights_only=False) if rank_file.is_file() else {}
        if same_world and "rng" in rank_state:
            set_rng_state(rank_state["rng"])
        return state, rank_state

    def load_weights(self, engine, path: Path, with_optimizer: bool, universal: bool = False) -> None:
        """Initialise from another run's checkpoint (a new stage): weights, optionally the
        optimizer (also across layouts, through the universal conversion); step, schedule and
        data start fresh."""
        source = self.universal_path(path) if universal else path
        with mapped_loads(engine):
            loaded, _ = engine.load_checkpoint(str(source.parent), tag=source.name, load_module_only=not with_optimizer,
                                               load_optimizer_states=with_optimizer, load_lr_scheduler_states=False)
        if loaded is None:
            raise UserError(f"trainer.init_from={path}: DeepSpeed could not load this checkpoint")


def mapped_load(path, map_location=None):
    """torch.load of a checkpoint file, memory-mapped when it is in torch's zip format (the
    default since torch 1.6; an older file is read whole, as before)."""
    if zipfile.is_zipfile(path):
        return torch.load(path, map_location=map_location, weights_only=False, mmap=True)
    return torch.load(path, map_location=map_location, weights_only=False)


@contextmanager
def mapped_loads(engine):
    """Within: the DeepSpeed engine's checkpoint engine loads files with `mapped_load`.

    DeepSpeed's torch checkpoint engine reads every file whole, and its model-states file twice
    (`SDLoaderFactory` loads it once only to check the parallel layout). For the 1.5B model that
    is ~10 GB read for ~7 GB of checkpoint; mapped, the check reads only the pickle and the
    tensors are copied once, into the parameters (3x faster on a warm page cache). DeepSpeed has
    no setting for this, so the engine's own `load` is wrapped for the duration of one call."""
    ckpt_engine = getattr(engine, "checkpoint_engine", None)
    if ckpt_engine is None or type(ckpt_engine).__name__ != "TorchCheckpointEngine":
        yield  # another engine (decoupled, nebula, ...) keeps its own loading
        return
    ckpt_engine.load = mapped_load
    try:
        yield
    finally:
        del ckpt_engine.load  # the class's method again
    _own_cpu_optimizer_state(engine)


def _own_cpu_optimizer_state(engine) -> None:
    """Copies of the optimizer's CPU state tensors (the optimizer offloaded to the CPU, or a run on
    the CPU): torch's `load_state_dict` keeps a loaded tensor as it is when its device and dtype
    already match, so without a copy the Adam moments would stay backed by the mapped file for the
    whole run (the file's disk space not freed when the checkpoint is pruned; copy-on-write page
    faults on the first update). States on the GPU were copied there already."""
    optimizer = getattr(engine, "optimizer", None)
    base = getattr(optimizer, "optimizer", optimizer)  # DeepSpeed's ZeRO wrapper holds the torch one
    for state in getattr(base, "state", {}).values():
        for name, value in state.items():
            if torch.is_tensor(value) and value.device.type == "cpu":
                state[name] = value.clone()


def load_plan(state: dict, world_size: int, zero_stage: int, weights_only: bool = False) -> str:
    """How a checkpoint saved with `state` loads into this run: "direct", "universal" (DeepSpeed
    universal checkpoint, for a new world size at the same ZeRO stage) or "unsupported"."""
    saved_world, saved_stage = int(state.get("world_size", world_size)), int(state.get("zero_stage", zero_stage))
    if weights_only:
        if saved_stage <= 2 and zero_stage <= 2:  # whole module weights sit in mp_rank_00_model_states.pt
            return "direct"
        return "direct" if (saved_world, saved_stage) == (world_size, zero_stage) else "unsupported"
    if saved_stage != zero_stage:
        return "unsupported"  # DeepSpeed's conversion does not change stages
    if saved_world == world_size or zero_stage == 0:  # ZeRO-0 optimizer state is not partitioned
        return "direct"
    return "universal"


def convert_to_universal(path: Path, out: Path) -> Path:
    """DeepSpeed's ds_to_universal of checkpoint `path` into `out` (rank 0 only; reused when done)."""
    marker = out / ".complete"
    if marker.is_file() and marker.read_text().strip() == str(path.resolve()):
        return out
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(path),
           "--output_folder", str(out), "--num_extract_workers", "1", "--num_merge_workers", "1",
           "--no_strict", "--inject_missing_state"]
    log.info("world size or ZeRO stage changed: converting %s to a DeepSpeed universal checkpoint", path)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        shutil.rmtree(out, ignore_errors=True)
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise UserError(f"converting {path} to a DeepSpeed universal checkpoint failed ({tail[0]}); "
                        "resume with the world size and ZeRO stage it was saved with")
    marker.write_text(str(path.resolve()) + "\n")
    return out


# ---------------------------------------------------------------------------------------------
# Hugging Face export


def export_hf(engine, hf_model, out_dir: Path, env: dist_utils.DistEnv, tokenizer_path: Path | None = None,
              prefix: str = "model.") -> Path | None:
    """A consolidated Hugging Face checkpoint (safetensors) of the trained model, written by
    rank 0 (ZeRO-3 parameters are gathered first; every rank must call)."""
    out_dir = Path(out_dir)
    if engine.zero_optimization_partition_weights():
        full = engine._zero3_consolidated_16bit_state_dict()  # every rank takes part; rank 0 gets it
        state_dict = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in (full or {}).items()}
    else:
        state_dict = None
    if env.is_main:
        tmp = out_dir.with_name(f"{TMP_PREFIX}{out_dir.name}")
        shutil.rmtree(tmp, ignore_errors=True)
        hf_model.save_pretrained(str(tmp), state_dict=state_dict, safe_serialization=True)
        if tokenizer_path is not None and Path(tokenizer_path).is_dir():
            for item in Path(tokenizer_path).iterdir():
                if item.is_file() and not (tmp / item.name).exists():
                    shutil.copy2(item, tmp / item.name)
        shutil.rmtree(out_dir, ignore_errors=True)
        os.rename(tmp, out_dir)
        log.info("exported Hugging Face checkpoint to %s", out_dir)
    dist_utils.barrier()
    return out_dir if env.is_main else None
