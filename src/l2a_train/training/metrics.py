"""Training metrics: metrics.jsonl, wandb (offline by default), a console progress bar, and the
throughput numbers (tokens/s, MFU, peak memory).

Only rank 0 writes. One JSON line per logged step, for example:

    {"step": 12, "tokens": 49152, "loss": 5.91, "lm_loss": 5.90, "reg": 410.2, "lambda": 2e-05,
     "lr": 0.002, "grad_norm": 1.3, "routed_fraction": 0.41, "skip_rate": 0.59,
     "routed_per_layer": [...], "mean_prob_per_layer": [...], "tokens_per_s": 5120.0,
     "mfu": null, "peak_mem_gib": 1.2, "step_time_s": 0.8, "elapsed_s": 9.6, "skipped": false}

`routed_fraction` is the fraction of (token, L2A layer) pairs sent to global attention (over all
layers when the model has no L2A layer), `skip_rate` = 1 - routed_fraction.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import secrets
import string
import sys
from pathlib import Path

import torch

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"

# Dense bf16 peak FLOP/s per GPU (tensor cores, no sparsity), by a substring of the device name.
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "H800": 989e12,
    "GH200": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
}


# ---------------------------------------------------------------------------------------------
# FLOPs and memory


def matmul_params(model) -> int:
    """Parameters used in matrix multiplies per token: all but the input embedding, plus the LM
    head (counted again when tied to the embedding). Call before ZeRO-3 partitions the model."""
    total = sum(p.numel() for p in model.parameters())
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    total -= embed.numel()
    if head is embed:
        total += head.numel()
    return total


class FlopsCounter:
    """Model FLOPs of a training step: 6 x matmul params per token, plus attention scores and
    values (fwd + bwd = 3 x 4 x heads x head_dim per query-key pair). Sliding-window layers see
    min(position + 1, W) keys, global attention position + 1 keys (its document's prefix), and
    an L2A layer's global attention only for the routed fraction of its queries, whose query and
    output projections (2 x hidden x heads x head_dim parameters) run for the routed tokens only
    (model FLOPs: a layer that drew the dense path projects every token, counted all the same)."""

    def __init__(self, model):
        cfg = model.config
        self.params = matmul_params(model)
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.attn_width = cfg.num_attention_heads * head_dim
        self.query_side_params = 2 * cfg.hidden_size * self.attn_width  # q_proj + o_proj of one attention
        self.window = int(getattr(cfg, "l2a_window", 0) or 0)
        self.layer_types = list(getattr(cfg, "l2a_layer_types", None) or ["global"] * cfg.num_hidden_layers)

    def key_counts(self, position_ids: torch.Tensor) -> torch.Tensor:
        """[tokens, keys in document prefix, keys in window] of a batch (float64, to all-reduce)."""
        pos = position_ids.to(torch.float64) + 1.0
        win = pos.clamp(max=self.window) if self.window > 0 else pos
        return torch.stack([torch.tensor(float(pos.numel()), dtype=torch.float64), pos.sum(), win.sum()])

    def step_flops(self, counts, routed_per_layer) -> float:
        tokens, full_keys, window_keys = (float(x) for x in counts)
        pair_flops = 12.0 * self.attn_width
        attn, skipped_params = 0.0, 0.0
        for kind, routed in zip(self.layer_types, routed_per_layer):
            if kind == "global":
                attn += full_keys
            elif kind == "swa":
                attn += window_keys
            else:
                attn += window_keys + float(routed) * full_keys
                skipped_params += (1.0 - float(routed)) * self.query_side_params
        return 6.0 * (self.params - skipped_params) * tokens + pair_flops * attn


def peak_flops(device: torch.device, precision: str, override_tflops=None) -> float | None:
    """Peak FLOP/s of one device for MFU, or None when unknown (CPU, fp32, unknown GPU)."""
    if override_tflops:
        return float(override_tflops) * 1e12
    if device.type != "cuda" or precision != "bf16":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_FLOPS.items():
        if key in name:
            return value
    return None


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated GPU memory, or the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def summarize_routing(routed_per_layer, layer_types) -> float:
    """Fraction of (token, L2A layer) pairs routed to global attention."""
    idx = [i for i, t in enumerate(layer_types) if t == "l2a"] or list(range(len(routed_per_layer)))
    return float(sum(routed_per_layer[i] for i in idx) / max(1, len(idx)))


# ---------------------------------------------------------------------------------------------
# Writers


def _finite_or_none(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def read_metrics(run_dir) -> list[dict]:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a kill
    return records


class MetricsLogger:
    """metrics.jsonl + optional wandb + a tqdm progress bar with ETA; a no-op except on rank 0."""

    def __init__(self, run_dir: Path, *, enabled: bool, total_steps: int, start_step: int, run_name: str,
                 config: dict, logger_cfg, wandb_id: str | None, progress: bool = True):
        self.enabled = enabled
        self.wandb_run = None
        self.wandb_id = wandb_id
        self.bar = None
        if not enabled:
            return
        self.path = Path(run_dir) / METRICS_FILE
        self._truncate_after(start_step)
        self.file = open(self.path, "a")
        if logger_cfg.wandb:
            self._init_wandb(run_dir, run_name, config, logger_cfg)
        if progress and logger_cfg.progress:
            from tqdm.auto import tqdm

            tty = sys.stderr.isatty()
            self.bar = tqdm(total=total_steps, initial=start_step, desc=run_name, unit="step",
                            dynamic_ncols=True, mininterval=0.2 if tty else 10.0, file=sys.stderr)

    def _truncate_after(self, step: int) -> None:
        """Keep the lines of steps <= `step` (a resume drops what the interrupted run logged later)."""
        if not self.path.exists():
            return
        keep = [r for r in read_metrics(self.path.parent) if r.get("step", 0) <= step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
        os.replace(tmp, self.path)

    def _init_wandb(self, run_dir, run_name, config, logger_cfg) -> None:
        import wandb

        if self.wandb_id is None:  # kept in every checkpoint, so a resumed run logs to the same wandb run
            alphabet = string.ascii_lowercase + string.digits
            self.wandb_id = "".join(secrets.choice(alphabet) for _ in range(8))
        self.wandb_run = wandb.init(
            project=logger_cfg.project,
            entity=logger_cfg.entity,
            name=run_name,
            id=self.wandb_id,
            resume="allow",
            dir=str(run_dir),
            mode=logger_cfg.mode,
            config=config,
        )

    def write(self, message: str) -> None:
        """A console line that does not break the progress bar."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr, flush=True)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {k: _finite_or_none(v) for k, v in record.items()}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.wandb_run is not None:
            flat = {k: v for k, v in record.items() if not isinstance(v, list) and v is not None}
            for key, prefix in (("routed_per_layer", "routed"), ("mean_prob_per_layer", "prob")):
                for i, v in enumerate(record.get(key) or []):
                    flat[f"{prefix}/layer_{i:02d}"] = v
            self.wandb_run.log(flat, step=record["step"])
        if self.bar is not None:
            self.bar.update(record["step"] - self.bar.n)
            loss = record.get("loss")
            self.bar.set_postfix(
                loss="nan" if loss is None else f"{loss:.4f}",
                routed=f"{record.get('routed_fraction', 0.0):.3f}",
                tok_s=f"{record.get('tokens_per_s') or 0:.0f}",
                refresh=False,
            )

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        self.file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
