"""Metric helpers: FLOPs estimate, routing summary, sweep folder names and summary table."""

import json
from types import SimpleNamespace

import pytest
import torch

from l2a_train.training.metrics import FlopsCounter, MetricsLogger, read_metrics, summarize_routing
from l2a_train.training.sweep import job_dirname, swept_keys, write_sweep_summary


class TinyModel(torch.nn.Module):
    def __init__(self, tied=True):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 4)
        self.body = torch.nn.Linear(4, 4, bias=False)
        self.head = torch.nn.Linear(4, 10, bias=False)
        if tied:
            self.head.weight = self.embed.weight
        self.config = SimpleNamespace(hidden_size=4, num_attention_heads=2, head_dim=2, num_hidden_layers=2,
                                      l2a_window=2, l2a_layer_types=["l2a", "global"])

    def get_input_embeddings(self):
        return self.embed

    def get_output_embeddings(self):
        return self.head


def test_flops_counter_by_hand():
    fc = FlopsCounter(TinyModel())
    assert fc.params == 16 + 40  # body + tied head (the embedding lookup is not a matmul)
    counts = fc.key_counts(torch.tensor([[0, 1, 2, 0]]))  # keys: 1,2,3,1 = 7; window 2: 1,2,2,1 = 6
    assert counts.tolist() == [4.0, 7.0, 6.0]
    flops = fc.step_flops(counts, [0.5, 1.0])
    # the L2A layer's q_proj + o_proj (2 x 4 x 4 parameters) run for its routed half of the tokens only
    assert flops == pytest.approx(6 * (56 - 0.5 * 32) * 4 + 12 * 4 * ((6 + 0.5 * 7) + 7))


def test_routing_summary_uses_l2a_layers():
    assert summarize_routing([0.2, 1.0, 0.4], ["l2a", "global", "l2a"]) == pytest.approx(0.3)
    assert summarize_routing([1.0, 0.0], ["global", "swa"]) == pytest.approx(0.5)


def test_metrics_logger_truncates_on_resume(tmp_path):
    from omegaconf import OmegaConf

    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "lm_loss": 1.0}) + "\n" for s in (1, 2, 3)))
    logger = MetricsLogger(tmp_path, enabled=True, total_steps=5, start_step=2, run_name="t", config={},
                           logger_cfg=OmegaConf.create({"wandb": False}), wandb_id=None, progress=False)
    logger.log({"step": 3, "lm_loss": float("nan"), "routed_fraction": 0.5})
    logger.close()
    assert [(m["step"], m["lm_loss"]) for m in read_metrics(tmp_path)] == [(1, 1.0), (2, 1.0), (3, None)]


def test_job_dirname_keeps_swept_keys(monkeypatch):
    monkeypatch.setattr("sys.argv", ["l2a-train", "-m", "data.path=/x/y", "l2a.window=16,32", "trainer.lr=1e-3"])
    assert swept_keys() == {"l2a.window"}
    assert job_dirname(["data.path=/x/y", "l2a.window=16", "trainer.lr=1e-3"]) == "l2a.window=16"
    monkeypatch.setattr("sys.argv", ["l2a-train"])
    assert job_dirname(["data.path=/x/y"]) == "data.path=_x_y"
    assert len(job_dirname([f"k{i}=" + "v" * 30 for i in range(10)])) <= 120


def test_sweep_summary_table(tmp_path):
    for name, loss in (("a=1", 2.0), ("a=2", 1.0)):
        job = tmp_path / name
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(f"- {name}\n- trainer.steps=2\n")
        (job / "metrics.jsonl").write_text("".join(
            json.dumps({"step": s, "lm_loss": loss, "skip_rate": 0.5, "tokens_per_s": 100.0}) + "\n" for s in (1, 2)))
    (tmp_path / "a=2" / "summary.json").write_text(json.dumps({"steps": 2, "final_loss": 1.0, "final_skip_rate": 0.5,
                                                                "tokens_per_s": 100.0, "status": "done"}))
    table = write_sweep_summary(tmp_path).read_text()
    assert "common overrides: `trainer.steps=2`" in table
    assert "| a=1 | 2 | 2.0000 | 0.500 | 100 |" in table and "running or killed" in table
    assert "| a=2 | 2 | 1.0000 |" in table and "| done |" in table


def test_profile_components_of_kernel_names():
    """trainer.profile_step's table: FlashAttention's forward is not taken for an L2A kernel (both
    names hold "_fwd_kernel"), and the kernels of a training step land in their components."""
    from l2a_train.training.profiling import component

    assert component("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128>>") == "attention (cuDNN / flash / SDPA)"
    assert component("cudnn_generated_fort_native_sdpa_sm90_flash_fprop") == "attention (cuDNN / flash / SDPA)"
    assert [component(n) for n in ("_fwd_kernel", "_bwd_dq_kernel", "_bwd_dkdv_kernel")] == ["attention (L2A kernels)"] * 3
    assert component("nvjet_sm90_tst_320x128_64x3_1x2_h_bz_coopB_TNT") == "matmuls"
    assert component("_triton_rope") == component("element_mul_kernel") == "fused norm / SwiGLU / RoPE / loss (liger)"
    assert component("void at::native::CatArrayBatchedCopy<float>") == "gathers, scatters, copies"
    assert component("void at::native::vectorized_elementwise_kernel<4, AddFunctor>") == "elementwise and the rest"


def test_profile_timeline_idle_gaps_and_host_waits():
    """The timeline part of trainer.profile_step: overlapping kernels on two streams count once,
    a gap below 5 us is not listed, an idle gap goes to the operator that launched the kernel after
    it (late launch: the host was behind), and a synchronising call to the operator that made it."""
    from types import SimpleNamespace as NS

    import torch

    from l2a_train.training.profiling import idle_gaps, timeline_markdown

    busy, span, gaps = idle_gaps([(30, 40, "c"), (0, 10, "a"), (8, 20, "b"), (41, 50, "d")])
    assert (busy, span, gaps) == (39, 50, [(10, 20, "c")])
    assert idle_gaps([]) == (0.0, 0.0, [])

    cuda, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU

    def ev(name, start, end, id=0, device=cpu, parent=None):  # times in ms here, in us for the profiler
        return NS(name=name, time_range=NS(start=start * 1000, end=end * 1000), id=id, device_type=device,
                  is_user_annotation=False, cpu_parent=parent, self_cpu_time_total=(end - start) * 1000)

    engine = ev("autograd::engine::evaluate_function: MmBackward0", 0, 100)
    mm_bwd = ev("aten::mm", 1, 99, parent=engine)
    nonzero = ev("aten::nonzero", 21, 29)
    events = [
        ev("k1", 0, 20, id=7, device=cuda), ev("cudaLaunchKernel", 0, 1, id=7, parent=nonzero),
        ev("k2", 30, 40, id=8, device=cuda), ev("cudaLaunchKernel", 25, 26, id=8, parent=mm_bwd),  # launched late
        ev("k3", 60, 70, id=9, device=cuda), ev("cuLaunchKernelEx", 35, 36, id=9, parent=nonzero),  # launched early
        ev("cudaStreamSynchronize", 22, 28, parent=nonzero), nonzero, mm_bwd, engine,
    ]
    cpu_ops = [e for e in events if e.device_type == cpu]
    averages = [NS(key=e.name, count=1, self_cpu_time_total=e.self_cpu_time_total, device_type=cpu)
                for e in cpu_ops if e.name != "cudaLaunchKernel"]
    averages.append(NS(key="cudaLaunchKernel", count=2, device_type=cpu,
                       self_cpu_time_total=sum(e.self_cpu_time_total for e in cpu_ops if e.name == "cudaLaunchKernel")))
    text = timeline_markdown(events, averages)
    assert "busy 40.0 ms (57.1%), idle 30.0 ms, of which 30.0 ms in 2 gaps" in text and "3 device operations" in text
    assert "(launch overhead): 10.0 ms" in text
    assert "| `aten::nonzero` | 1 | 20.0 | 0.0 | 20,000 |" in text  # k3 was queued before the GPU went idle
    assert "| `aten::mm [backward]` | 1 | 10.0 | 10.0 | 10,000 |" in text  # the host launched k2 late
    waits = text.split("by the operator that made them):")[1].split("Host time")[0]
    assert "| `aten::nonzero` | 1 | 6.0 |" in waits and "mm" not in waits
    host = text.split("Host time by operator")[1]
    assert "| `aten::mm` | 1 | 98.0 | 98,000.0 |" in host  # own time of each operator
