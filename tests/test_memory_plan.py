"""The memory plan of `l2a-train`: printed before the model is built, a dry run on CPU, one line
and no run files when it does not fit, and its calibration against measured peaks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
QWEN3_8B = ("model.config={vocab_size: 151936, hidden_size: 4096, intermediate_size: 12288, num_hidden_layers: 36, "
            "num_attention_heads: 32, num_key_value_heads: 8, head_dim: 128, max_position_embeddings: 131072, "
            "rope_theta: 5000000.0, rms_norm_eps: 1.0e-6, tie_word_embeddings: false}")
QWEN2_5_1_5B = ("model.config={vocab_size: 151936, hidden_size: 1536, intermediate_size: 8960, num_hidden_layers: 28, "
                "num_attention_heads: 12, num_key_value_heads: 2, max_position_embeddings: 131072, "
                "rope_theta: 5000000.0, rms_norm_eps: 1.0e-6, tie_word_embeddings: true}")
QWEN2_5_7B = ("model.config={vocab_size: 152064, hidden_size: 3584, intermediate_size: 18944, num_hidden_layers: 28, "
              "num_attention_heads: 28, num_key_value_heads: 4, max_position_embeddings: 262144, "
              "rope_theta: 5000000.0, rms_norm_eps: 1.0e-6, tie_word_embeddings: false}")
QWEN2_5_7B_4_LAYERS = ("model.config={vocab_size: 152064, hidden_size: 3584, intermediate_size: 18944, "
                       "num_hidden_layers: 4, num_attention_heads: 28, num_key_value_heads: 4, "
                       "max_position_embeddings: 131072, rope_theta: 1000000.0, rms_norm_eps: 1.0e-6, "
                       "tie_word_embeddings: false}")


def _train(cwd, *args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    return subprocess.run([str(BIN / "l2a-train"), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.e2e
def test_dry_run_of_qwen3_8b_at_128k_on_cpu(tmp_path):
    proc = _train(tmp_path, "experiment=qwen3_8b_128k_1gpu", "model.path=null", QWEN3_8B, "trainer.dry_run=true",
                  "trainer.memory_limit_gib=139.8", f"run_root={tmp_path / 'runs'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert ("9.70B parameters (3.02B trainable), 1 GPU(s), ZeRO-2, bf16, 1 x 131072 tokens, checkpointing, "
            "attention outputs kept in the last 6 of 36 layers") in out
    for term in ("| weights |", "| gradients |", "| optimizer |", "| checkpoints |", "| transient |",
                 "| kept attention outputs | 12.0 |"):
        assert term in out
    assert "| **predicted peak** | **132.0** |" in out  # inside 139.8 GiB less the 5% reserve (132.8)
    run_dir = tmp_path / "runs" / "qwen3_8b_128k_1gpu"
    assert sorted(p.name for p in run_dir.iterdir()) == [".hydra", "train.log"]  # no model, no run files


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    work = tmp_path_factory.mktemp("plan")
    proc = subprocess.run([str(BIN / "l2a-prep"), "prep=quickstart", f"output={work / 'data'}", "seq_len=256",
                           "max_tokens=8000", "sources.retrieval.num_docs=20", "tokenizer.train.vocab_size=300",
                           "tokenizer.train.sample_chars=50000", f"tokenizer.train.cache_dir={work / 'tok'}",
                           "progress=false"], cwd=work, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return work / "data"


@pytest.mark.e2e
def test_plan_over_the_device_stops_before_the_model_with_one_line(tmp_path, data):
    proc = _train(tmp_path, "experiment=quickstart", f"data.path={data}", "model.path=null", "l2a.window=32",
                  "trainer.memory_limit_gib=0.01", f"run_root={tmp_path / 'runs'}")
    errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "the memory plan needs" in errors[0] and "the biggest term is" in errors[0]
    assert "trainer.dry_run=true" in errors[0]
    run_dir = tmp_path / "runs" / "quickstart"
    assert sorted(p.name for p in run_dir.iterdir()) == [".hydra", "train.log"]  # nothing of a run started


@pytest.mark.parametrize("name, overrides, seq_len, measured_gib", [
    # each measured with l2a-train on one H200 (docs/BENCHMARKS.md, "Memory plan")
    ("Qwen2.5-1.5B, 32K, attention outputs kept", ["experiment=qwen2_5_1_5b_32k", QWEN2_5_1_5B], 32768, 19.06),
    ("Qwen2.5-7B shape with 4 layers, 128K", ["experiment=qwen2_5_1_5b_32k", "model=qwen2_5_7b", QWEN2_5_7B_4_LAYERS,
                                              "trainer.keep_attention_outputs=false"], 131072, 36.1),
    ("Qwen3-8B shape, L2A, 128K", ["experiment=qwen3_8b_128k_1gpu", QWEN3_8B, "l2a=random", "trainer.keep_attention_outputs=false"], 131072, 113.4),
    ("Qwen3-8B shape, full attention, 128K", ["experiment=qwen3_8b_128k_1gpu", QWEN3_8B, "l2a=full", "trainer.keep_attention_outputs=false"], 131072, 86.9),
    ("Qwen2.5-7B shape, L2A, 128K", ["experiment=qwen2_5_7b_128k_1gpu", QWEN2_5_7B, "l2a=random", "trainer.keep_attention_outputs=false"], 131072, 84.7),
    *((f"Qwen3-8B shape, L2A, {n // 1024}K, optimizer offloaded",
       ["experiment=qwen3_8b_128k_1gpu", QWEN3_8B, "l2a=random", "model.max_position_embeddings=262144",
        "+deepspeed.zero_optimization.offload_optimizer={device: cpu, pin_memory: true}",
        *(["trainer.keep_attention_outputs=false"] if n > 196608 else [])], n, gib)
      for n, gib in ((196608, 123.1), (262144, 137.3))),
])
def test_plan_within_ten_percent_of_measured_peaks(name, overrides, seq_len, measured_gib):
    from l2a_common import compose
    from l2a_train.training import memory
    from l2a_train.model.convert import BASE_CONFIGS

    cfg = compose("train", [*overrides, "model.path=null", "data.path=unused"])
    base, is_l2a = memory.base_config(cfg.model, BASE_CONFIGS)
    predicted = memory.plan(cfg, memory.shape_of(base, cfg.l2a, is_l2a), seq_len, world_size=1).total / memory.GIB
    assert abs(predicted / measured_gib - 1) < 0.10, (name, predicted)


def test_zero_sharding_and_offload_shrink_the_plan():
    from l2a_common import compose
    from l2a_train.training import memory
    from l2a_train.model.convert import BASE_CONFIGS

    def total(*overrides, world=1):
        cfg = compose("train", ["experiment=qwen3_8b_128k", "model.path=null", "data.path=x", QWEN3_8B, *overrides])
        base, is_l2a = memory.base_config(cfg.model, BASE_CONFIGS)
        return memory.plan(cfg, memory.shape_of(base, cfg.l2a, is_l2a), 131072, world).terms

    one, eight = total(), total(world=8)
    assert eight["optimizer"] == pytest.approx(one["optimizer"] / 8, rel=1e-6) and eight["weights"] == one["weights"]
    assert total("deepspeed=zero3", world=8)["weights"] == pytest.approx(one["weights"] / 8, rel=1e-6)
    offloaded = total("+deepspeed.zero_optimization.offload_optimizer={device: cpu}")
    assert offloaded["optimizer"] == 0 and offloaded["gradients"] < one["gradients"] / 10
    kept = total("trainer.keep_attention_outputs=true")
    assert kept["kept attention outputs"] == 72 * 131072 * 32 * 128 * 2  # 36 layers x 2 attentions
    six = total("trainer.keep_attention_outputs=6")  # the last 6 layers: 12 attention calls
    assert six["kept attention outputs"] == 12 * 131072 * 32 * 128 * 2


@pytest.mark.parametrize("value", ["0", "-2", "'all'"])
def test_keep_attention_outputs_is_a_bool_or_a_layer_count(value):
    from l2a_common import UserError, compose
    from l2a_train.training import check_config

    cfg = compose("train", ["experiment=qwen3_8b_128k_1gpu", "model.path=null", QWEN3_8B, "data.seq_len=131072",
                            "trainer.dry_run=true", f"trainer.keep_attention_outputs={value}"])
    with pytest.raises(UserError, match=r"trainer.keep_attention_outputs=.*: give true \(every layer\), false \(none\) "
                                        r"or a number of layers >= 1") as err:
        check_config(cfg, 1)
    assert "\n" not in str(err.value)
