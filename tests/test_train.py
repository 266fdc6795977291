"""The trainer end to end on CPU (gloo), with the real L2A model and real packed data.

To keep the suite fast, single-process runs share one Python process (`_runner`: imports and
DeepSpeed start-up are paid once) and every run is tiny: 4-layer model, rows of 128 tokens,
6 steps. What is checked:

- a quickstart-like run: the loss goes down; metrics.jsonl, checkpoint, curves.png, summary,
  Hugging Face export (reloadable) and wandb (offline) files exist with the expected fields;
- ZeRO-2 and ZeRO-3 with 2 processes (torchrun) give the losses of 1 process with the same
  global batch;
- 6 steps in one go == 3 steps + SIGTERM (save, exit) + resume + a SIGKILL in the middle of a
  checkpoint write + resume (identical losses, routing and gradient norms);
- a checkpoint of 2 processes resumes in 1 process (DeepSpeed universal checkpoint);
- a new stage starts from another run's weights with fresh step, schedule and data;
- a NaN/Inf loss skips the update (ZeRO-0 and ZeRO-2), then saves and stops with one line;
- a 2x2 sweep gives 4 run directories and summary.md; config errors give one line, exit 2;
- user mistakes: data of another tokenizer than the model's, a setting that an L2A checkpoint
  fixes, a resume with other run-defining settings stop with one line; resume=never keeps the
  earlier run's files; the padding of the last row is not a target.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e  # runs the commands as a user does; `pytest -m "not e2e"` runs the unit tests

BIN = Path(sys.executable).parent
STEPS = 6

RUNNER = r"""
import json, os, sys, time
from l2a_common import UserError, compose
from l2a_train.training import run

results = []
for job in json.loads(sys.argv[1]):
    os.environ.pop("L2A_FAULT", None)
    if job.get("fault"):
        os.environ["L2A_FAULT"] = job["fault"]
    started = time.time()
    try:
        run(compose("train", job["overrides"]))
        results.append({"status": "ok"})
    except UserError as err:
        results.append({"status": "user_error", "message": str(err)})
    except SystemExit as err:
        results.append({"status": "exit", "code": err.code})
    print(f"job {len(results)}: {time.time() - started:.1f} s", file=sys.stderr, flush=True)
print("RESULTS " + json.dumps(results), flush=True)
"""


def _env(**extra) -> dict:
    env = dict(os.environ)
    env.pop("L2A_FAULT", None)
    env.update(
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        WANDB_MODE="offline",
        TOKENIZERS_PARALLELISM="false",
        # DeepSpeed compiles a small CPU communication op on first use (~25 s); keep it cached
        TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR") or str(Path.home() / ".cache" / "torch_extensions"),
    )
    env.update(extra)
    return env


def _run(cmd, cwd, timeout=300, **env) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=_env(**env), capture_output=True, text=True, timeout=timeout)


def _runner(jobs, cwd) -> list[dict]:
    proc = _run([sys.executable, "-c", RUNNER, json.dumps(jobs)], cwd, timeout=400)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULTS ")]
    assert proc.returncode == 0 and lines, f"runner failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}"
    return json.loads(lines[-1][len("RESULTS "):])


def _metrics(run_dir) -> list[dict]:
    return [json.loads(l) for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if l.strip()]


def _base(data, root, *extra) -> list[str]:
    return ["experiment=quickstart", f"data.path={data}", "model.path=null", "l2a.window=32", f"trainer.steps={STEPS}",
            "trainer.warmup_steps=2", f"run_root={root}", *extra]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("train")


@pytest.fixture(scope="module")
def data(work):
    """A small packed data set written by the real `l2a-prep` (rows of 128 tokens)."""
    out = work / "data"
    proc = _run([BIN / "l2a-prep", "prep=quickstart", f"output={out}", "seq_len=128", "max_tokens=40000",
                 "tokenizer.train.sample_chars=200000", f"tokenizer.train.cache_dir={work / 'tokenizers'}",
                 "progress=false"], work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def single(work, data):
    """The single-process runs, in one process."""
    jobs = {
        # quickstart-like: ZeRO-2, 4 rows per step, wandb offline, HF export (the parity reference)
        "ref": dict(overrides=_base(data, work / "ref", "trainer.micro_batch_size=4", "trainer.save_every=3",
                                    "logger=wandb")),
        # 2 rows x 2 accumulation steps, uninterrupted (the resume reference)
        "accum": dict(overrides=_base(data, work / "accum", "trainer.micro_batch_size=2", "trainer.grad_accum=2",
                                      "trainer.save_every=2", "trainer.export_hf=false")),
        # the same run, stopped by SIGTERM after step 3 (it saves, then exits 128 + 15)
        "sigterm": dict(overrides=_base(data, work / "resume", "trainer.micro_batch_size=2", "trainer.grad_accum=2",
                                        "trainer.save_every=2", "trainer.export_hf=false", "logger=wandb"),
                        fault="sigterm_at:3"),
        # the same run split by trainer.stop_at=3 (clean stop with a checkpoint; resumed in `resumed`)
        "stop_at": dict(overrides=_base(data, work / "stop_at", "trainer.micro_batch_size=2", "trainer.grad_accum=2",
                                        "trainer.save_every=0", "trainer.export_hf=false", "trainer.stop_at=3")),
        # NaN losses at steps 2 and 4; one bad step allowed: 2 is skipped, 4 stops the run
        "nan0": dict(overrides=_base(data, work / "nan0", "deepspeed=zero0", "trainer.micro_batch_size=2",
                                     "trainer.max_bad_steps=1", "trainer.save_every=0"), fault="nan_at:2,4"),
        "nan2": dict(overrides=_base(data, work / "nan2", "trainer.micro_batch_size=2", "trainer.max_bad_steps=1",
                                     "trainer.save_every=0"), fault="nan_at:2,4"),
        # no checkpoint at all (save_every=0, save_final=false), the HF export still written
        "no_final": dict(overrides=_base(data, work / "no_final", "trainer.micro_batch_size=2", "trainer.save_every=0",
                                         "trainer.save_final=false", "trainer.profile_step=2")),
        # the reference under ZeRO-3 with checkpointing that keeps attention outputs
        "kept": dict(overrides=_base(data, work / "kept", "trainer.micro_batch_size=4", "deepspeed=zero3",
                                     "trainer.grad_checkpointing=true", "trainer.keep_attention_outputs=true",
                                     "trainer.save_every=0", "trainer.export_hf=false")),
    }
    results = _runner(list(jobs.values()), work)
    return dict(zip(jobs, results))


@pytest.fixture(scope="module")
def parallel(work, data, single):
    """ZeRO-2 and ZeRO-3 with 2 processes, 2 rows each (the reference's global batch): one torchrun
    launch running a 2-job sweep, which also covers multirun under torchrun."""
    root = work / "par"
    proc = _run([BIN / "torchrun", "--standalone", "--nproc_per_node=2", "-m", "l2a_train.cli.train", "-m",
                 *_base(data, root, "trainer.micro_batch_size=2", "trainer.save_every=3"), "deepspeed=zero2,zero3"],
                work)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {stage: root / "quickstart-sweep" / f"deepspeed={stage}" for stage in ("zero2", "zero3")}


@pytest.fixture(scope="module")
def resumed(work, data, single, parallel):
    """After the SIGTERM of `single`: resume and get killed (SIGKILL) in the middle of the next
    checkpoint write; then, in one process, resume again to the end, and resume the 2-process
    ZeRO-2 checkpoint of step 3 in 1 process (universal checkpoint)."""
    args = _base(data, work / "resume", "trainer.micro_batch_size=2", "trainer.grad_accum=2", "trainer.save_every=2",
                 "trainer.export_hf=false", "logger=wandb")
    killed = _run([BIN / "l2a-train", *args], work, L2A_FAULT="kill_in_save:1")
    ckpt = work / "resume" / "quickstart" / "checkpoints"
    after_kill = {"rc": killed.returncode, "stderr": killed.stderr[-3000:], "latest": (ckpt / "latest").read_text().strip(),
                  "tmp": sorted(p.name for p in ckpt.glob(".tmp-*"))}
    source = parallel["zero2"] / "checkpoints" / "step_00000003"
    jobs = {
        "resume": dict(overrides=args),
        "stop_at": dict(overrides=_base(data, work / "stop_at", "trainer.micro_batch_size=2", "trainer.grad_accum=2",
                                        "trainer.save_every=0", "trainer.export_hf=false")),
        "universal": dict(overrides=_base(data, work / "universal", "trainer.micro_batch_size=4",
                                          f"trainer.resume='{source}'", "trainer.export_hf=false")),
        # a new stage from the 2-process run's final weights, in 1 process: fresh step, schedule, data
        "stage": dict(overrides=_base(data, work / "stage", "trainer.micro_batch_size=4", "trainer.steps=2",
                                      "trainer.warmup_steps=1", f"trainer.init_from='{parallel['zero2']}'",
                                      "trainer.export_hf=false")),
        # ZeRO-2 optimizer state into ZeRO-3: not convertible, one clear line
        "stage_change": dict(overrides=_base(data, work / "zero3", "deepspeed=zero3", "trainer.micro_batch_size=4",
                                             f"trainer.resume='{source}'")),
        # the reference's name again with other hyperparameters: stops before any work
        "changed": dict(overrides=_base(data, work / "ref", "trainer.micro_batch_size=4", "trainer.save_every=3",
                                        "logger=wandb", "trainer.lr=1e-3", "l2a.temperature=0.2", "trainer.steps=9")),
        # a copy of a finished run, started over with trainer.resume=never
        "never": dict(overrides=_base(data, work / "never", "trainer.micro_batch_size=2", "trainer.steps=1",
                                      "trainer.warmup_steps=0", "trainer.resume=never", "trainer.export_hf=false")),
    }
    shutil.copytree(work / "accum" / "quickstart", work / "never" / "quickstart")
    results = dict(zip(jobs, _runner(list(jobs.values()), work)))
    return {"after_kill": after_kill, **results}


def test_save_final_false_writes_no_checkpoint_but_the_export(work, data, single):
    assert single["no_final"] == {"status": "ok"}
    run_dir = work / "no_final" / "quickstart"
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "done"
    assert not list((run_dir / "checkpoints").glob("step_*"))  # the ref run (save_every=3) has two
    assert (run_dir / "hf" / "model.safetensors").is_file()
    # started again (trainer.resume=auto): nothing holds its last step, so one line instead of a retrain
    again = _run([BIN / "l2a-train", *_base(data, work / "no_final", "trainer.micro_batch_size=2", "trainer.save_every=0",
                                            "trainer.save_final=false")], work)
    errors = [line for line in again.stderr.splitlines() if line.startswith("error:")]
    assert again.returncode == 2 and len(errors) == 1, again.stderr[-3000:]
    assert "finished run of 6 steps whose last checkpoint is none (trainer.save_final=false)" in errors[0]
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "done"  # left as it was


def test_profile_step_writes_a_table_of_that_step(work, single):
    """trainer.profile_step=2 (set in the no_final run): a Markdown profile of step 2 only."""
    run_dir = work / "no_final" / "quickstart"
    assert [p.name for p in run_dir.glob("profile-step*")] == ["profile-step2.md"]
    text = (run_dir / "profile-step2.md").read_text()
    assert text.startswith("# Profile of optimizer step 2")
    assert "| matmuls |" in text and "| component | ms | share |" in text
    components = text.split("| component | ms | share |\n|---|---:|---:|\n")[1].split("\n\n")[0].splitlines()
    shares = [float(row.split("|")[3].strip().rstrip("%")) for row in components]
    assert len(shares) >= 2 and abs(sum(shares) - 100) < 0.5  # every operator in one component


def test_quickstart_like_run(work, single):
    assert single["ref"] == {"status": "ok"}
    run_dir = work / "ref" / "quickstart"
    metrics = _metrics(run_dir)
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    fields = {"step", "tokens", "loss", "lm_loss", "reg", "lambda", "lr", "grad_norm", "routed_fraction", "skip_rate",
              "routed_per_layer", "mean_prob_per_layer", "tokens_per_s", "mfu", "peak_mem_gib", "step_time_s",
              "elapsed_s", "skipped"}
    assert fields <= set(metrics[0])
    assert len(metrics[0]["routed_per_layer"]) == 4 and len(metrics[0]["mean_prob_per_layer"]) == 4
    assert metrics[0]["routed_fraction"] == 1.0  # the router starts at zero: p = 0.5, every token routed
    assert metrics[-1]["lm_loss"] < metrics[0]["lm_loss"] - 0.2
    assert [m["lambda"] for m in metrics[:2]] == [0.0, 0.0] and metrics[-1]["lambda"] > 0  # 0 during warmup
    assert metrics[-1]["tokens"] == STEPS * 4 * 128 and metrics[-1]["tokens_per_s"] > 0
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert ckpts == ["step_00000003", "step_00000006"]
    state = json.loads((run_dir / "checkpoints" / "step_00000006" / "trainer_state.json").read_text())
    assert state["step"] == STEPS and state["tokens_seen"] == STEPS * 512 and state["wandb_id"]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000006"
    assert (run_dir / "curves.png").stat().st_size > 10_000
    assert list((run_dir / "wandb").glob(f"offline-run-*-{state['wandb_id']}"))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "done" and summary["steps"] == STEPS
    assert (run_dir / "config.yaml").is_file() and (run_dir / "deepspeed_config.json").is_file()

    from transformers import AutoModelForCausalLM

    import l2a_train  # noqa: F401  (registers the L2A model types)

    model = AutoModelForCausalLM.from_pretrained(run_dir / "hf")
    assert model.config.model_type == "l2a_qwen3" and (run_dir / "hf" / "model.safetensors").is_file()
    assert (run_dir / "hf" / "tokenizer.json").is_file()


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_two_processes_match_one(work, single, parallel, stage):
    ref = _metrics(work / "ref" / "quickstart")
    par = _metrics(parallel[stage])
    assert [m["step"] for m in par] == [m["step"] for m in ref]
    for a, b in zip(ref, par):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6)
        assert b["routed_per_layer"] == pytest.approx(a["routed_per_layer"], abs=1e-6)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
        assert b["tokens"] == a["tokens"]
    if stage == "zero3":  # the consolidated export gathers the partitioned weights
        from safetensors.torch import load_file

        a = load_file(work / "ref" / "quickstart" / "hf" / "model.safetensors")
        b = load_file(parallel[stage] / "hf" / "model.safetensors")
        assert a.keys() == b.keys()
        for key in a:
            assert (a[key] - b[key]).abs().max() < 1e-4, key


def test_checkpointing_that_keeps_attention_matches_the_reference(work, single):
    """trainer.keep_attention_outputs under ZeRO-3 (parameters gathered again for the recompute)
    trains like the plain ZeRO-2 reference."""
    assert single["kept"] == {"status": "ok"}
    ref, kept = _metrics(work / "ref" / "quickstart"), _metrics(work / "kept" / "quickstart")
    assert [m["step"] for m in kept] == [m["step"] for m in ref]
    for a, b in zip(ref, kept):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6)
        assert b["routed_per_layer"] == pytest.approx(a["routed_per_layer"], abs=1e-6)


def test_resume_after_sigterm_and_kill_during_save_is_exact(work, single, resumed):
    assert single["sigterm"] == {"status": "exit", "code": 128 + signal.SIGTERM}  # saved step 3, then exited
    killed = resumed["after_kill"]
    assert killed["rc"] == -signal.SIGKILL, killed["stderr"]
    assert killed["tmp"] == [".tmp-step_00000004"]  # the half-written checkpoint
    assert killed["latest"] == "step_00000003"  # the previous one untouched
    assert resumed["resume"] == {"status": "ok"}
    run_dir = work / "resume" / "quickstart"
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))
    reference, result = _metrics(work / "accum" / "quickstart"), _metrics(run_dir)
    assert [m["step"] for m in result] == list(range(1, STEPS + 1))
    for a, b in zip(reference, result):
        assert (a["loss"], a["routed_per_layer"], a["mean_prob_per_layer"], a["grad_norm"], a["tokens"]) == \
               (b["loss"], b["routed_per_layer"], b["mean_prob_per_layer"], b["grad_norm"], b["tokens"]), a["step"]
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "done"
    # one wandb run id across the three processes (offline runs, one folder per process)
    ids = {p.name.rsplit("-", 1)[-1] for p in (run_dir / "wandb").glob("offline-run-*")}
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) >= 2 and len(ids) == 1


def test_stop_at_then_resume_is_exact(work, single, resumed):
    assert single["stop_at"] == {"status": "ok"} and resumed["stop_at"] == {"status": "ok"}
    reference, result = _metrics(work / "accum" / "quickstart"), _metrics(work / "stop_at" / "quickstart")
    assert [m["step"] for m in result] == list(range(1, STEPS + 1))
    assert [(m["loss"], m["routed_per_layer"]) for m in result] == [(m["loss"], m["routed_per_layer"]) for m in reference]
    ckpts = sorted(p.name for p in (work / "stop_at" / "quickstart" / "checkpoints").glob("step_*"))
    assert ckpts == ["step_00000003", "step_00000006"]


def test_world_size_change_resumes_through_universal_checkpoint(work, resumed):
    """A 2-process ZeRO-2 checkpoint (step 3) continues in 1 process with the same global batch."""
    assert resumed["universal"] == {"status": "ok"}
    ref = {m["step"]: m for m in _metrics(work / "ref" / "quickstart")}
    result = _metrics(work / "universal" / "quickstart")
    assert [m["step"] for m in result] == [4, 5, 6]
    for m in result:
        assert m["loss"] == pytest.approx(ref[m["step"]]["loss"], rel=1e-5)
        assert m["routed_per_layer"] == pytest.approx(ref[m["step"]]["routed_per_layer"], abs=1e-6)


def test_zero_stage_change_stops_with_one_line(resumed):
    result = resumed["stage_change"]
    assert result["status"] == "user_error" and "\n" not in result["message"]
    assert "ZeRO stage 2" in result["message"] and "deepspeed=zero2" in result["message"]


def test_new_stage_starts_from_weights_with_fresh_schedule(work, resumed):
    assert resumed["stage"] == {"status": "ok"}
    ref, stage = _metrics(work / "ref" / "quickstart"), _metrics(work / "stage" / "quickstart")
    assert [m["step"] for m in stage] == [1, 2]
    assert stage[0]["lambda"] == 0.0 and stage[0]["lr"] == pytest.approx(2e-3)  # warmup of 1 step, from step 1
    assert stage[0]["tokens"] == 512  # data and token count start over
    assert stage[0]["lm_loss"] < ref[0]["lm_loss"] - 0.2  # trained weights, not a fresh model


@pytest.mark.parametrize("name", ["nan0", "nan2"])
def test_nan_steps_are_skipped_then_run_stops(work, single, name):
    result = single[name]
    assert result["status"] == "user_error"
    assert "non-finite" in result["message"] and "trainer.max_bad_steps=1" in result["message"]
    assert "\n" not in result["message"]
    metrics = _metrics(work / name / "quickstart")
    assert [(m["step"], m["skipped"]) for m in metrics] == [(1, False), (2, True), (3, False), (4, True)]
    assert metrics[1]["loss"] is None  # NaN is written as null
    assert metrics[2]["loss"] is not None and metrics[2]["grad_norm"] is not None  # weights not poisoned
    state = json.loads((work / name / "quickstart" / "checkpoints" / "step_00000004" / "trainer_state.json").read_text())
    assert state["step"] == 4


def test_nan_skip_is_the_same_in_zero0_and_zero2(work, single):
    a, b = _metrics(work / "nan0" / "quickstart"), _metrics(work / "nan2" / "quickstart")
    assert a[2]["loss"] == pytest.approx(b[2]["loss"], rel=1e-6)


def test_sweep_2x2_writes_four_runs_and_a_summary(work, data):
    proc = _run([BIN / "l2a-train", "-m", *_base(data, work / "sweep", "trainer.steps=2", "trainer.warmup_steps=1",
                                                  "trainer.micro_batch_size=2", "trainer.save_every=0",
                                                  "trainer.export_hf=false"),
                 "l2a.window=16,32", "l2a.regularizer.lambda_max=1e-5,1e-4"], work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep = work / "sweep" / "quickstart-sweep"
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert jobs == sorted(f"l2a.window={w},l2a.regularizer.lambda_max={l}" for w in (16, 32) for l in ("1e-05", "0.0001"))
    for job in jobs:
        assert (sweep / job / "metrics.jsonl").is_file() and (sweep / job / "curves.png").is_file()
    table = (sweep / "summary.md").read_text()
    rows = [l for l in table.splitlines() if l.startswith("| l2a.window=")]
    assert len(rows) == 4 and all(r.rstrip().endswith("| done |") for r in rows)
    assert "final loss" in table and "tokens/s" in table and "skip rate" in table


def test_plot_cli_several_runs(work, single, tmp_path):
    from l2a_train.cli.plot import main

    out = tmp_path / "two.png"
    main([str(work / "ref" / "quickstart"), str(work / "accum" / "quickstart"), "--out", str(out), "--smooth", "2"])
    assert out.stat().st_size > 10_000
    with pytest.raises(SystemExit) as err:
        main([str(tmp_path / "nothing"), "--out", str(out)])
    assert err.value.code == 2


# ---------------------------------------------------------------------------------------------
# Config errors: one clear line, before any heavy work


def _check(data, *overrides, world_size=1):
    from l2a_common import compose
    from l2a_train.training import check_config

    return check_config(compose("train", ["experiment=quickstart", f"data.path={data}", "model.path=null", "l2a.window=32",
                                          *overrides]),
                        world_size)


@pytest.mark.parametrize(
    "overrides, world, expected",
    [
        (["data.path=/no/such/data"], 1, "no manifest.json"),
        (["model.path=/no/such/model"], 1, "model.path=/no/such/model does not exist"),
        (["l2a.window=128"], 1, "l2a.window=128 is not smaller than the rows' 128 tokens"),
        (["model.config.max_position_embeddings=64"], 1, "exceed the model's max_position_embeddings=64"),
        (["trainer.global_batch_size=6", "trainer.micro_batch_size=4"], 1, "not a multiple of micro_batch_size"),
        (["trainer.global_batch_size=6", "trainer.micro_batch_size=2"], 2, "not a multiple of micro_batch_size"),
        (["trainer.lr_schedule=step"], 1, "trainer.lr_schedule='step'"),
        (["trainer.warmup_steps=500", "trainer.steps=10"], 1, "below trainer.steps=10"),
        (["model.config.vocab_size=1000"], 1, "vocab_size=1000"),
        (["trainer.init_from=/no/such/run"], 1, "trainer.init_from=/no/such/run does not exist"),
        (["trainer.keep_attention_outputs=true"], 1, "only applies with trainer.grad_checkpointing=true"),
        (["trainer.profile_step=11", "trainer.steps=10"], 1, "trainer.profile_step=11: give an optimizer step from 1"),
    ],
)
def test_config_errors(data, overrides, world, expected):
    from l2a_common import UserError

    with pytest.raises(UserError) as err:
        _check(data, *overrides, world_size=world)
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_config_plan(data):
    plan = _check(data, "trainer.global_batch_size=8", "trainer.micro_batch_size=2", world_size=2)
    assert plan.grad_accum == 2 and plan.seq_len == 128
    assert _check(data, "model.config.max_position_embeddings=64", "model.max_position_embeddings=128").seq_len == 128


def test_config_error_cli_one_line_exit_2(work, data):
    proc = _run([BIN / "l2a-train", f"data.path={data}", "model.path=null", "l2a.window=4095"], work)
    assert proc.returncode == 2
    errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and "l2a.window=4095" in errors[0] and "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------------------------
# GPU: the same trainer with CUDA, bf16, the L2A kernels and liger's fused cross-entropy


@pytest.mark.gpu
def test_gpu_smoke_bf16_kernels_liger(work, data):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    results = _runner([dict(overrides=_base(data, work / "gpu", "trainer.precision=bf16", "trainer.micro_batch_size=4",
                                            "trainer.grad_checkpointing=true", "trainer.keep_attention_outputs=true",
                                            "trainer.save_every=3", "trainer.profile_step=3"))], work)
    assert results == [{"status": "ok"}]
    profile = (work / "gpu" / "quickstart" / "profile-step3.md").read_text()
    assert "| attention (L2A kernels) |" in profile and "| matmuls |" in profile  # CUDA kernels, by component
    assert "## Timeline" in profile and "Idle gaps by the operator that launched" in profile  # the device timeline
    metrics = _metrics(work / "gpu" / "quickstart")
    assert metrics[-1]["lm_loss"] < metrics[0]["lm_loss"] and not any(m["skipped"] for m in metrics)
    assert metrics[-1]["mfu"] is None or 0 < metrics[-1]["mfu"] < 1
    assert (work / "gpu" / "quickstart" / "hf" / "model.safetensors").is_file()


# ---------------------------------------------------------------------------------------------
# Mistakes a user makes in the first hour: each one stops with one line, or keeps what it finds


def _convert(out, tokenizer, *extra):
    from l2a_common import compose
    from l2a_train.cli.convert import main as convert_main

    if not out.exists():
        convert_main.task(compose("convert", ["model=tiny_qwen3", "l2a.window=32", f"tokenizer={tokenizer}",
                                              f"output={out}", *extra]))
    return out


@pytest.fixture(scope="module")
def other_tokenizer(work):
    from l2a_data_prep.tokenizer import train_builtin

    text = [f"def f{i}(x):\n    return x * {i} + {i * 7}\n" for i in range(400)]
    return Path(train_builtin(text, 300, str(work / "other-tokenizers")))


def test_model_and_data_tokenizers_must_match(work, data, other_tokenizer):
    """A model with its own tokenizer trained on data of another: one line naming both, unless
    data.allow_tokenizer_mismatch=true; the export ships the model's tokenizer."""
    foreign = _convert(work / "foreign-l2a", other_tokenizer)
    proc = _run([BIN / "l2a-train", "experiment=quickstart", f"data.path={data}", f"model.path={foreign}"], work)
    errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"data.path={data}" in errors[0] and f"model.path={foreign}" in errors[0]
    assert "data.allow_tokenizer_mismatch=true" in errors[0] and "the data's tokenizer has 4096 tokens" in errors[0]
    plan = _check(data, f"model.path={foreign}", "data.allow_tokenizer_mismatch=true")
    assert plan.tokenizer == foreign  # the export would copy the model's tokenizer, not the data's
    own = _convert(work / "own-l2a", data / "tokenizer")  # re-saved by l2a-convert: still the same tokenizer
    assert _check(data, f"model.path={own}").tokenizer == own
    assert _check(data).tokenizer == data / "tokenizer"  # built from a config: the data's is the model's


def test_setting_fixed_by_an_l2a_checkpoint_is_an_error(work, data):
    """Sweeping the window of an L2A checkpoint would give identical runs labelled differently."""
    ckpt = _convert(work / "own-l2a", data / "tokenizer")
    common = ["experiment=quickstart", f"data.path={data}", f"model.path={ckpt}", f"run_root={work / 'fixed'}"]
    proc = _run([BIN / "l2a-train", "-m", *common, "l2a.window=48,64"], work)
    errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-2000:]
    assert "l2a.window=48" in errors[0] and "fixed when l2a-convert converted it (window 32)" in errors[0]
    proc = _run([BIN / "l2a-train", *common, "l2a=swa"], work)
    assert proc.returncode == 2 and "l2a.mode=swa" in proc.stderr and "(mode l2a)" in proc.stderr
    # the same window, or nothing set: no error and no warning about the experiment's l2a.window=128
    plan = _check(data, f"model.path={ckpt}", "l2a.window=128")
    assert plan.seq_len == 128


def test_resume_with_other_settings_stops_with_a_diff(resumed):
    """A second run under the same name with other hyperparameters must not silently continue the first."""
    result = resumed["changed"]
    assert result["status"] == "user_error" and "\n" not in result["message"], result
    message = result["message"]
    assert "trainer.lr: 0.002 -> 0.001" in message and "l2a.temperature: 0.1 -> 0.2" in message
    assert "trainer.steps" not in message  # may change on resume
    assert "trainer.resume_override=true" in message and "trainer.resume=never" in message


def test_run_defining_keys():
    from l2a_train.training.resume import changed_settings

    saved = {"trainer": {"lr": 1e-3, "steps": 10, "save_every": 5, "betas": [0.9, 0.95]}, "l2a": {"window": 32},
             "logger": {"wandb": False}, "run_root": "a"}
    same = {"trainer": {"lr": 1e-3, "steps": 20, "save_every": 2, "betas": [0.9, 0.95]}, "l2a": {"window": 32},
            "logger": {"wandb": True}, "run_root": "b"}
    assert changed_settings(saved, same) == []
    other = {"trainer": {"lr": 1e-3, "steps": 10, "save_every": 5, "betas": [0.9, 0.99]}, "l2a": {"window": 32, "x": 1}}
    assert changed_settings(saved, other) == ["l2a.x: (unset) -> 1", "trainer.betas: [0.9, 0.95] -> [0.9, 0.99]"]


def test_resume_never_keeps_the_earlier_run(work, resumed):
    """trainer.resume=never starts over and moves every file of the earlier run aside."""
    run_dir = work / "never" / "quickstart"
    assert resumed["never"] == {"status": "ok"}
    [aside] = list(run_dir.glob("replaced-*"))
    old = _metrics(aside)
    assert [m["step"] for m in old] == list(range(1, STEPS + 1))  # the earlier run, whole
    assert (aside / "summary.json").is_file() and (aside / "config.yaml").is_file()
    assert sorted(p.name for p in (aside / "checkpoints").glob("step_*")) == ["step_00000004", "step_00000006"]
    assert [m["step"] for m in _metrics(run_dir)] == [1]  # the new run
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 1


def test_padding_of_the_last_row_is_not_a_target(data):
    from l2a_train.data import PackedDataset, PackedLoader
    from l2a_train.training.loss import next_token_labels

    ds = PackedDataset(data)
    pad = int(ds.manifest["pad_tokens"])
    assert pad > 0  # the data set's last row is padded
    loader = PackedLoader(ds, micro_batch_size=ds.num_rows, rank=0, world_size=1, seed=0, shuffle=False)
    batch = loader.next_batch()
    assert int(batch["padding"].sum()) == pad and bool(batch["padding"][-1, -1])
    labels = next_token_labels(batch["input_ids"], batch["position_ids"], batch["padding"])
    assert (labels[batch["padding"]] == -100).all()
    before = int((next_token_labels(batch["input_ids"], batch["position_ids"]) != -100).sum())
    assert int((labels != -100).sum()) == before - (pad - 1)  # the row's last position never had a target


def test_offloaded_optimizer_is_deepspeeds_cpu_adam(monkeypatch):
    """DeepSpeed refuses a torch optimizer under ZeRO-Offload (the one-GPU 8B experiment's setting
    for rows of 192K and more stopped at engine set-up): with the optimizer offloaded the trainer
    builds DeepSpeed's CPU Adam in AdamW mode, with the same groups and settings."""
    import torch
    import deepspeed.ops.adam as ds_adam
    from l2a_common import compose
    from l2a_train.training.engine import make_optimizer

    made = {}

    class RecordingCPUAdam:  # the real one compiles a C++ op on first use
        def __init__(self, groups, **settings):
            made.update(settings, groups=groups)

    monkeypatch.setattr(ds_adam, "DeepSpeedCPUAdam", RecordingCPUAdam)
    module = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    offload = "+deepspeed.zero_optimization.offload_optimizer={device: cpu, pin_memory: true}"
    for overrides, expected in (([offload], RecordingCPUAdam), ([], torch.optim.AdamW)):
        cfg = compose("train", ["experiment=qwen3_8b_128k_1gpu", "model.path=null", "data.path=x", *overrides])
        optimizer = make_optimizer(module, cfg.trainer, cfg.deepspeed.zero_optimization, torch.device("cpu"))
        assert type(optimizer) is expected
    assert made["adamw_mode"] is True and made["lr"] == 5e-5 and made["betas"] == (0.9, 0.95) and made["eps"] == 1e-8
    assert [len(g["params"]) for g in made["groups"]] == [1, 3]  # decay: the matrix; none: bias and norm
