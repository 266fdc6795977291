"""Base Qwen model -> L2A model (docs/METHOD.md), and building models from Hydra configs.

Conversion copies, for every converted layer, the base attention into both attentions and the
layer's input norm into the second norm; the router starts at zero. `init=preserve` also zeroes
the SWA output projection so the converted model computes exactly the base model at step 0.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, Qwen2Config, Qwen3Config
from transformers.initialization import no_init_weights

from l2a_common import UserError

from ..checkpoint_config import read_config as read_config_json
from .config import CONFIG_BY_FAMILY, FAMILY_BY_MODEL_TYPE
from .modeling import MODEL_BY_FAMILY

BASE_CONFIGS = {"qwen2": Qwen2Config, "qwen3": Qwen3Config}
MODES = ("l2a", "full", "swa", "random", "static")
INITS = ("paper", "preserve")
WEIGHTS, WEIGHTS_INDEX, LEGACY_WEIGHTS = "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"
LAYER_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.")  # model.layers.<i>.self_attn.q_proj.weight


def select_layers(spec, num_layers: int, setting: str = "l2a.layers") -> list[int]:
    """`all`, a list of indices, or `every:k` (layers k-1, 2k-1, ...: the k-th, 2k-th, ...)."""
    if spec in (None, "all"):
        return list(range(num_layers))
    if isinstance(spec, str) and spec.startswith("every:"):
        try:
            k = int(spec.split(":", 1)[1])
        except ValueError:
            k = 0
        if k < 1:
            raise UserError(f"{setting}='{spec}': k in every:k must be a positive integer")
        return [i for i in range(num_layers) if (i + 1) % k == 0]
    if isinstance(spec, int):
        spec = [spec]
    try:
        layers = sorted({int(i) for i in spec})
    except (TypeError, ValueError):
        raise UserError(f"{setting}={spec!r}: use all, a list such as [0, 2], or every:k") from None
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise UserError(f"{setting}: layer index {bad} out of range; the model has layers 0..{num_layers - 1}")
    return layers


def l2a_group(name: str = "l2a", overrides: list[str] | tuple = ()):
    """The `l2a` config group `configs/l2a/<name>.yaml` as the commands compose it (its defaults
    live there alone), with `key=value` overrides of its settings: for code that builds a model
    without a command line (evaluating a base checkpoint as full attention, the benchmarks)."""
    from l2a_common.app import compose

    return compose("convert", [f"l2a={name}", *(f"l2a.{o}" for o in overrides)]).l2a


def layer_types_for(l2a_cfg, num_layers: int) -> list[str]:
    mode = l2a_cfg["mode"]
    if mode not in MODES:
        raise UserError(f"l2a.mode='{mode}' is not one of {MODES}")
    chosen = set(select_layers(l2a_cfg["layers"], num_layers))
    if mode == "full":
        return ["global"] * num_layers
    if mode == "static":
        every = int(l2a_cfg["static_every"])
        globals_ = set(select_layers(f"every:{every}", num_layers, "l2a.static_every"))
        return ["global" if i in globals_ else "swa" for i in range(num_layers)]
    if not chosen:  # every layer would stay global: a full-attention copy that claims to be L2A
        raise UserError(
            f"l2a.layers={_plain_spec(l2a_cfg.get('layers'))} selects none of the model's {num_layers} layers, so no "
            f"layer would be converted (l2a.mode={mode}); use all, a non-empty list such as [0, 2], or every:k "
            f"with k <= {num_layers} (l2a=full for a full-attention model)"
        )
    converted = "swa" if mode == "swa" else "l2a"
    return [converted if i in chosen else "global" for i in range(num_layers)]


def _plain_spec(spec):
    """`l2a.layers` as the user wrote it ([] rather than ListConfig's repr)."""
    from omegaconf import ListConfig, OmegaConf

    return OmegaConf.to_container(spec) if isinstance(spec, ListConfig) else spec


def l2a_fields(l2a_cfg, num_layers: int) -> dict:
    """The config.json fields of an L2A model, from a composed `l2a` group (configs/l2a/*.yaml;
    `l2a_group` composes one). Checked by the config class (`validate_l2a`)."""
    return dict(
        l2a_layer_types=layer_types_for(l2a_cfg, num_layers),
        l2a_window=int(l2a_cfg["window"]),
        l2a_temperature=float(l2a_cfg["temperature"]),
        l2a_threshold=float(l2a_cfg["threshold"]),
        l2a_p_dense=float(l2a_cfg["p_dense"]),
        l2a_routing="random" if l2a_cfg["mode"] == "random" else "learned",
        l2a_random_rate=float(l2a_cfg["random_rate"]),
        l2a_backend=str(l2a_cfg["backend"]),
        l2a_fused_ops=str(l2a_cfg["fused_ops"]),
    )


def _check_window(config) -> None:
    """A window as wide as the model's positions is full attention under another name: the
    converted layers would pay for routing and two attentions and gain nothing."""
    windowed = any(kind != "global" for kind in config.l2a_layer_types)
    positions = int(config.max_position_embeddings)
    if windowed and config.l2a_window >= positions:
        raise UserError(
            f"l2a.window={config.l2a_window} is not smaller than the model's {positions} positions "
            f"(max_position_embeddings): sliding-window attention would see everything; choose l2a.window "
            f"below {positions} (or raise model.max_position_embeddings to extend the context)"
        )


def _dtype(name) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[str(name)]


def apply_context_overrides(config, model_cfg) -> None:
    """RoPE theta and max positions for context extension (paper: 5e6 and 131072)."""
    if model_cfg.get("rope_theta") is not None:
        config.rope_parameters = {**(config.rope_parameters or {}), "rope_theta": float(model_cfg.rope_theta)}
    if model_cfg.get("max_position_embeddings") is not None:
        config.max_position_embeddings = int(model_cfg.max_position_embeddings)


def read_model_type(path: Path) -> str:
    return read_config_json(path).get("model_type", "")


def _one_line(err: BaseException, limit: int = 300) -> str:
    """An exception's message on one line: transformers' and huggingface_hub's span several."""
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory (one file, or the shards its index names);
    [] for a legacy pytorch_model.bin checkpoint."""
    index = path / WEIGHTS_INDEX
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as err:
            raise UserError(
                f"model.path={path}: {WEIGHTS_INDEX} is not a safetensors index ({_one_line(err)}); "
                "re-download or re-export the checkpoint"
            ) from None
        missing = [name for name in shards if not (path / name).is_file()]
        if missing:
            raise UserError(
                f"model.path={path}: {WEIGHTS_INDEX} names {len(shards)} weight shards, {len(missing)} of them "
                f"missing ({', '.join(missing[:3])}); re-download or re-export the checkpoint"
            )
        return [path / name for name in shards]
    if (path / WEIGHTS).is_file():
        return [path / WEIGHTS]
    if (path / LEGACY_WEIGHTS).is_file():
        return []
    raise UserError(
        f"model.path={path}: no weights there ({WEIGHTS}, {WEIGHTS_INDEX} or {LEGACY_WEIGHTS}); "
        "point it at a complete Hugging Face checkpoint directory"
    )


def weight_layers(files: list[Path]) -> set[int]:
    """The decoder-layer indices the weights hold, read from the safetensors headers only (no
    tensor is loaded). A file that cannot be read is truncated or not safetensors at all."""
    from safetensors import SafetensorError, safe_open

    layers: set[int] = set()
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                keys = list(handle.keys())
        except (SafetensorError, OSError) as err:
            raise UserError(
                f"model.path={file.parent}: {file.name} is truncated or not a safetensors file ({_one_line(err)}); "
                "re-download or re-export it"
            ) from None
        layers.update(int(m.group(1)) for key in keys if (m := LAYER_KEY.search(key)))
    return layers


def check_weights(path: Path) -> None:
    """The weight files are readable and hold config.json's number of layers. Checked before
    from_pretrained, which reports both as a 26- to 41-line traceback without the file's name."""
    files = weight_files(path)
    if not files:
        return  # pytorch_model.bin: from_pretrained reads it (its errors are caught in load_checkpoint)
    layers = weight_layers(files)
    expected = read_config_json(path).get("num_hidden_layers")
    if isinstance(expected, int) and len(layers) != expected:
        holder = files[0].name if len(files) == 1 else f"the {len(files)} weight shards"
        raise UserError(
            f"model.path={path}: config.json says {expected} layers (num_hidden_layers) but {holder} "
            f"{'holds' if len(files) == 1 else 'hold'} weights for {len(layers)}; use the config.json that came "
            "with these weights"
        )


def read_config(path: Path):
    """config.json as a transformers config; its validation errors (several lines) as one line."""
    try:
        return AutoConfig.from_pretrained(str(path))
    except Exception as err:  # strict-dataclass, ValueError, KeyError, ...: many types, the message is what matters
        raise UserError(f"model.path={path}: config.json is not a valid configuration ({_one_line(err)})") from None


def load_checkpoint(path: Path, dtype: torch.dtype, configure=None, config=None, device=None):
    """from_pretrained that refuses, in one line each, unreadable weights and weights that do not
    match their config. `configure(config)` adjusts the config before the weights load; `config`
    replaces config.json. The weights load on the CPU (memory-mapped safetensors; transformers'
    `device_map` would need accelerate) and then move to `device`."""
    from safetensors import SafetensorError

    check_weights(path)
    config = read_config(path) if config is None else config
    if configure is not None:
        configure(config)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            str(path), config=config, dtype=dtype, output_loading_info=True
        )
    except (RuntimeError, ValueError, OSError, SafetensorError) as err:
        raise UserError(f"{path}: the checkpoint does not match its config.json ({_one_line(err)})") from None
    missing = [k for k in info.get("missing_keys", []) if "rotary_emb" not in k]
    mismatched = info.get("mismatched_keys", [])
    unexpected = info.get("unexpected_keys", [])
    if missing or mismatched or unexpected:
        detail = f"missing {sorted(missing)[:3]}" if missing else f"unexpected/mismatched {(list(unexpected) + list(mismatched))[:3]}"
        raise UserError(f"{path}: the weights do not match config.json ({detail}); is config.json from this checkpoint?")
    return model.to(device) if device is not None else model


def _plain_config(path: Path, config: dict):
    """The Qwen config of an L2A checkpoint whose layers are all global (`config`: its config.json):
    a model trained with l2a=full (such as a base pretrained from a config) is a plain Qwen model in
    L2A clothing, with the same weight names, so it converts like one."""
    types = set(config.get("l2a_layer_types") or ["global"])
    if types != {"global"}:
        raise UserError(f"model.path={path} is already an L2A model (layer types {sorted(types)}); convert its base "
                        "model instead, or train this checkpoint as it is (l2a-train model.path=...)")
    family = FAMILY_BY_MODEL_TYPE[config["model_type"]]
    fields = {k: v for k, v in config.items() if not k.startswith("l2a_") and k not in ("model_type", "architectures")}
    return BASE_CONFIGS[family](**fields)


def build_base(model_cfg, device=None):
    """The base Qwen model: from a local directory, or from `model.config` with random weights.

    The weights are created (or loaded) on `device` (default: the CPU). Random weights are
    seeded by `model.seed`; they are reproducible on one kind of device, but a GPU draws other
    numbers than the CPU."""
    family = model_cfg.get("family")
    if family not in BASE_CONFIGS:
        raise UserError(f"model.family='{family}' is not supported; use qwen2 (Qwen2.5) or qwen3")
    dtype = _dtype(model_cfg["dtype"])
    if model_cfg.get("path"):
        path = Path(model_cfg.path)
        if not path.is_dir():
            raise UserError(f"model.path={path} does not exist; give a local Hugging Face checkpoint directory")
        stored = read_config_json(path)
        model_type = stored.get("model_type", "")
        if model_type in ("l2a_qwen2", "l2a_qwen3"):
            return load_checkpoint(path, dtype, config=_plain_config(path, stored), device=device)
        if model_type not in ("qwen2", "qwen3"):
            raise UserError(
                f"model.path={path} holds a '{model_type}' model; only Qwen2/Qwen2.5 and Qwen3 models can be converted"
            )
        return load_checkpoint(path, dtype, device=device)
    if not model_cfg.get("config"):
        raise UserError("model.path is null and model.config is empty: give a checkpoint or an architecture")
    # null entries mean "the family's default" (tiny_qwen2 drops Qwen3's head_dim this way)
    config = BASE_CONFIGS[family](**{k: v for k, v in _plain(model_cfg.config).items() if v is not None})
    torch.manual_seed(int(model_cfg["seed"]))
    with torch.device(device or "cpu"):  # initialising on the GPU takes seconds where the CPU takes minutes
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def _plain(node) -> dict:
    from omegaconf import DictConfig, OmegaConf

    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)


@torch.no_grad()
def convert_model(base, l2a_cfg, model_cfg=None):
    """A base Qwen2/Qwen3 causal LM -> the L2A model described by `l2a_cfg`."""
    model_type = base.config.model_type
    if model_type not in ("qwen2", "qwen3"):
        raise UserError(f"cannot convert a '{model_type}' model; only Qwen2/Qwen2.5 and Qwen3 are supported")
    init = l2a_cfg["init"]
    if init not in INITS:
        raise UserError(f"l2a.init='{init}' is not one of {INITS}")
    fields = l2a_fields(l2a_cfg, base.config.num_hidden_layers)
    base_dict = base.config.to_dict()
    for key in ("model_type", "architectures", "transformers_version"):
        base_dict.pop(key, None)
    config = CONFIG_BY_FAMILY[model_type](**base_dict, **fields)
    config.use_cache = True  # generate() decodes with an L2ACache (l2a_train.model.cache)
    if model_cfg is not None:
        apply_context_overrides(config, model_cfg)
    _check_window(config)
    # Every weight is overwritten below (the base's, copies of them, the zero router), so the
    # model is allocated on the base's device without running the initialisers: for a 1.5B model
    # that initialisation was most of the conversion time.
    with no_init_weights(), torch.device(base.device):
        model = MODEL_BY_FAMILY[model_type]._from_config(config, dtype=base.dtype)

    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    new = ("global_attn.", "global_layernorm.", "router.")
    if unexpected or [k for k in missing if not any(n in k for n in new)]:
        raise UserError(f"base weights do not fit the L2A model (unexpected {unexpected[:3]}, missing {missing[:3]})")
    for layer in model.model.layers:
        if layer.layer_type != "l2a":
            continue
        layer.global_attn.load_state_dict(layer.self_attn.state_dict())
        layer.global_layernorm.load_state_dict(layer.input_layernorm.state_dict())
        layer.router.weight.zero_()
        if init == "preserve":
            layer.self_attn.o_proj.weight.zero_()
            if layer.self_attn.o_proj.bias is not None:
                layer.self_attn.o_proj.bias.zero_()
    if config.tie_word_embeddings:
        model.tie_weights()
    return model


RUNTIME_FIELDS = ("p_dense", "backend", "fused_ops", "threshold", "temperature", "random_rate")


def build_model(model_cfg, l2a_cfg, device=None):
    """The model to train or evaluate, from the `model` and `l2a` config groups, with its weights
    created or loaded on `device` (default: the CPU).

    - `model.path` null or a base Qwen checkpoint: converted on the fly with `l2a_cfg`;
    - an L2A checkpoint: loaded; its structure (layer types, window) is kept, and the runtime
      settings of `l2a_cfg` (p_dense, backend, fused_ops, threshold, temperature, random_rate) apply.
    """
    path = Path(model_cfg.path) if model_cfg.get("path") else None
    if path is not None and path.is_dir() and read_model_type(path).startswith("l2a_"):

        def configure(config) -> None:
            apply_context_overrides(config, model_cfg)
            for key in RUNTIME_FIELDS:
                if l2a_cfg.get(key) is not None:
                    setattr(config, f"l2a_{key}", l2a_cfg[key])
            config.validate_l2a()

        return load_checkpoint(path, _dtype(model_cfg["dtype"]), configure, device=device)
    return convert_model(build_base(model_cfg, device), l2a_cfg, model_cfg)


TRAINABLE_PRESETS = ("all", "paper", "router")


def apply_trainable(model, preset: str) -> int:
    """Sets requires_grad by preset; returns the number of trainable parameters.

    paper: attention (both), all norms, router; MLP, embeddings and LM head frozen.
    """
    if preset not in TRAINABLE_PRESETS:
        raise UserError(f"l2a.trainable='{preset}' is not one of {TRAINABLE_PRESETS}")
    keys = {
        "all": None,
        "paper": ("self_attn.", "global_attn.", "layernorm.", "router.", "model.norm."),
        "router": ("router.",),
    }[preset]
    count = 0
    for name, param in model.named_parameters():
        param.requires_grad_(keys is None or any(k in name for k in keys))
        count += param.numel() if param.requires_grad else 0
    return count
