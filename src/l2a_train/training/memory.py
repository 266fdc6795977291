"""The memory plan: the predicted peak of GPU memory per process, before any heavy work.

`l2a-train` prints it before the model is built, stops with one line when it exceeds the
device's memory, and `trainer.dry_run=true` prints it and exits (no model, no GPU needed).
The terms, per process, for a step of `micro_batch_size` rows of T tokens:

    weights      every parameter in the training dtype (ZeRO-3: a 1/world share)
    gradients    the trainable parameters' fp32 gradient partition (ZeRO-2/3: 1/world) plus
                 DeepSpeed's reduce bucket in the training dtype
    optimizer    fp32 master weights and Adam's two moments of the trainable parameters
                 (ZeRO-1/2/3: 1/world; zero with the optimizer offloaded to the CPU)
    checkpoints  with gradient checkpointing, each layer's input hidden states (B x T x hidden)
    kept         with trainer.keep_attention_outputs, every attention call's output (B x T x
                 heads x head_dim), two per L2A layer (with a number N of layers: N calls plus
                 one per L2A layer among them, counted as if they were all L2A layers)
    transient    the largest short-lived allocation: the recomputed forward and the backward of
                 one layer (its MLP activations and their gradients, four to six B x T x
                 intermediate tensors) or, without checkpointing, every layer's activations;
                 or the fused cross-entropy's chunk of logits, whichever is larger

These are the allocations that scale with the model and the row; what is left (the CUDA
context, kernels' workspaces, allocator fragmentation) is the RESERVE share of the device kept
free. docs/BENCHMARKS.md compares the prediction with measured peaks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from l2a_common import UserError

from ..model.checkpointing import kept_layers

GIB = 2**30
RESERVE = 0.05  # of the device memory: CUDA context, workspaces, allocator fragmentation
# B x T x intermediate tensors alive while one layer's MLP is recomputed and differentiated: gate,
# up, their product and its gradient with liger's fused SwiGLU (which writes the input gradients
# in place); two more with transformers' MLP (the activation's output and the product's inputs).
# With B x T x 8 hidden-sized tensors besides, these reproduce the measured peaks within 1-3%
# (docs/BENCHMARKS.md); they are fitted there, not derived from the allocator.
MLP_TENSORS = {"liger": 4, "none": 6}
HIDDEN_TENSORS = 8
# l2a.trainable presets (model.apply_trainable) in terms of Shape.parameters()
TRAINABLE_KEYS = {"all": None, "paper": ("attn", "norm", "router"), "router": ("router",)}


@dataclass
class Shape:
    """What the plan needs of an architecture (read from config.json or model.config, no weights)."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    l2a_layers: int  # layers with a second (global) attention

    def parameters(self) -> dict[str, int]:
        attn = self.hidden * self.heads * self.head_dim * 2 + self.hidden * self.kv_heads * self.head_dim * 2
        per_layer_norms = 3 * self.hidden
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        return {
            "attn": attn * (self.layers + self.l2a_layers),
            "router": self.hidden * self.l2a_layers,
            "norm": per_layer_norms * self.layers + self.hidden,
            "mlp": 3 * self.hidden * self.intermediate * self.layers,
            "embeddings": embeddings,
        }


def shape_of(base: dict, l2a_cfg, is_l2a: bool) -> Shape:
    """The architecture of a config.json (base or L2A) or of `model.config` (family defaults
    filled in by the caller), with the layers that conversion would give a global attention."""
    layers = int(base["num_hidden_layers"])
    heads = int(base["num_attention_heads"])
    if is_l2a:
        l2a_layers = list(base.get("l2a_layer_types") or []).count("l2a")
    elif l2a_cfg.mode in ("l2a", "random"):
        from ..model import select_layers

        l2a_layers = len(select_layers(l2a_cfg.layers, layers))
    else:
        l2a_layers = 0
    return Shape(
        layers=layers, hidden=int(base["hidden_size"]), intermediate=int(base["intermediate_size"]), heads=heads,
        kv_heads=int(base.get("num_key_value_heads") or heads),
        head_dim=int(base.get("head_dim") or int(base["hidden_size"]) // heads), vocab=int(base["vocab_size"]),
        tied=bool(base.get("tie_word_embeddings", False)), l2a_layers=l2a_layers)


@dataclass
class MemoryPlan:
    terms: dict[str, int]  # name -> bytes per process
    settings: str  # what the plan assumed, in words
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.terms.values())

    def markdown(self, device_bytes: int | None = None) -> str:
        lines = [f"Memory plan per GPU ({self.settings}):", "", "| term | GiB |", "|---|---|"]
        lines += [f"| {name} | {value / GIB:.1f} |" for name, value in self.terms.items()]
        lines.append(f"| **predicted peak** | **{self.total / GIB:.1f}** |")
        if device_bytes:
            lines.append(f"| device memory (less {RESERVE:.0%} reserve) | {device_bytes / GIB:.1f} "
                         f"({device_bytes * (1 - RESERVE) / GIB:.1f}) |")
        return "\n".join(lines + [f"- {n}" for n in self.notes])

    def check(self, device_bytes: int | None) -> None:
        """One line naming the biggest term and what would make the plan fit."""
        if not device_bytes or self.total <= device_bytes * (1 - RESERVE):
            return
        biggest = max(self.terms, key=self.terms.get)
        raise UserError(
            f"the memory plan needs {self.total / GIB:.1f} GiB per GPU but the device has {device_bytes / GIB:.1f} GiB "
            f"(less {RESERVE:.0%} reserve); the biggest term is {biggest} ({self.terms[biggest] / GIB:.1f} GiB): "
            f"{FIXES[biggest]} (trainer.dry_run=true prints the plan)")


FIXES = {
    "weights": "shard the weights with deepspeed=zero3 over more GPUs, or train a smaller model",
    "gradients": "shard them over more GPUs (ZeRO-2/3) or train fewer parameters (l2a.trainable=paper or router)",
    "optimizer": "offload it (deepspeed.zero_optimization.offload_optimizer.device=cpu), shard it over more GPUs, "
                 "or train fewer parameters (l2a.trainable=paper or router)",
    "checkpoints": "shorter rows (data.seq_len), trainer.micro_batch_size=1, or more GPUs per sequence",
    "kept attention outputs": "trainer.keep_attention_outputs=false (recompute them) or fewer layers "
                              "(trainer.keep_attention_outputs=N), or shorter rows",
    "transient": "trainer.grad_checkpointing=true, trainer.micro_batch_size=1, or shorter rows",
}


def plan(cfg, shape: Shape, seq_len: int, world_size: int) -> MemoryPlan:
    t, zero = cfg.trainer, cfg.deepspeed.zero_optimization
    stage = int(zero.stage)
    bf16 = t.precision == "bf16"
    width = 2 if bf16 else 4  # bytes of a weight, an activation, a bucket element
    params = shape.parameters()
    keys = TRAINABLE_KEYS[str(cfg.l2a.trainable)]
    total = sum(params.values())
    trainable = total if keys is None else sum(params[k] for k in keys)
    share = 1 / world_size
    offload = optimizer_offloaded(zero)

    tokens = int(t.micro_batch_size) * seq_len
    terms = {
        "weights": int(total * width * (share if stage == 3 else 1)),
        "gradients": int(trainable * 4 * (share if stage >= 2 else 1) * (0 if offload else 1)
                         + min(trainable, int(zero.get("reduce_bucket_size") or 5e8)) * width),
        "optimizer": 0 if offload else int(trainable * (12 if bf16 else 8) * (share if stage >= 1 else 1)),
    }
    mlp = MLP_TENSORS[str(cfg.l2a.fused_ops)]
    layer_activations = tokens * (mlp * shape.intermediate + HIDDEN_TENSORS * shape.hidden) * width
    if t.grad_checkpointing:
        terms["checkpoints"] = tokens * shape.hidden * width * shape.layers
        if t.keep_attention_outputs:
            kept = kept_layers(t.keep_attention_outputs, shape.layers)
            calls = kept + min(kept, shape.l2a_layers)
            terms["kept attention outputs"] = tokens * shape.heads * shape.head_dim * width * calls
        transient = layer_activations
    else:
        transient = layer_activations * shape.layers
    # the fused linear cross-entropy materialises logits for a chunk of rows (liger sizes it
    # as ~ tokens / (vocab / hidden)), in float32, with their gradient
    chunk = min(tokens, _next_pow2(max(1, tokens // max(1, shape.vocab // shape.hidden))))
    terms["transient"] = max(transient, chunk * shape.vocab * 4 * 2)
    settings = (f"{total / 1e9:.2f}B parameters ({trainable / 1e9:.2f}B trainable), {world_size} GPU(s), ZeRO-{stage}"
                f"{', optimizer offloaded' if offload else ''}, {t.precision}, {t.micro_batch_size} x {seq_len} tokens, "
                f"{'checkpointing' if t.grad_checkpointing else 'no checkpointing'}"
                f"{_kept_words(t, shape.layers)}")
    return MemoryPlan(terms, settings)


def optimizer_offloaded(zero) -> bool:
    """deepspeed.zero_optimization.offload_optimizer.device is set (cpu or nvme)."""
    return str((zero.get("offload_optimizer") or {}).get("device") or "none") != "none"


def _kept_words(t, layers: int) -> str:
    if not (t.grad_checkpointing and t.keep_attention_outputs):
        return ""
    kept = kept_layers(t.keep_attention_outputs, layers)
    return ", attention outputs kept" + ("" if kept == layers else f" in the last {kept} of {layers} layers")


def _next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def device_memory(cfg, device) -> int | None:
    """Bytes of the device to plan for: trainer.memory_limit_gib, else the CUDA device's own."""
    if cfg.trainer.get("memory_limit_gib"):
        return int(float(cfg.trainer.memory_limit_gib) * GIB)
    if device.type == "cuda":
        import torch

        return int(torch.cuda.get_device_properties(device).total_memory)
    return None


def base_config(model_cfg, family_configs) -> tuple[dict, bool]:
    """(config.json of model.path, or model.config with the family's defaults; is it L2A)."""
    if model_cfg.get("path"):
        from ..checkpoint_config import read_config

        config = read_config(model_cfg.path)
        return config, str(config.get("model_type", "")).startswith("l2a_")
    from omegaconf import OmegaConf

    given = {k: v for k, v in OmegaConf.to_container(model_cfg.config, resolve=True).items() if v is not None}
    return family_configs[model_cfg.family](**given).to_dict(), False
