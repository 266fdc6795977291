"""What the benchmark scripts share: model shapes, common arguments, CUDA synchronisation.

The scripts import it as a sibling module (`python scripts/bench_*.py` puts scripts/ on sys.path).
"""

from __future__ import annotations

import argparse

import torch

SHAPES = {
    # Qwen/Qwen2.5-1.5B config.json, positions extended to 128K as in the paper's recipe
    "qwen2.5-1.5b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=131072,
                         rope_theta=5.0e6, rms_norm_eps=1e-6, tie_word_embeddings=True),
    "tiny": dict(vocab_size=4096, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                 rope_theta=1.0e4, rms_norm_eps=1e-6, tie_word_embeddings=True),
}


def parser(doc: str, variants: tuple[str, ...], default_variants: str, dtypes) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-1.5b")
    p.add_argument("--layers", type=int, default=None, help="override the number of layers")
    p.add_argument("--lengths", default="32768,65536,131072", help="comma-separated sequence lengths")
    p.add_argument("--variants", default=default_variants, help=f"comma-separated, from {','.join(variants)}")
    p.add_argument("--window", type=int, default=4095, help="sliding window W")
    p.add_argument("--density", type=float, default=0.2, help="fraction of tokens routed to global attention")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(dtypes), default="bfloat16")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the results here")
    return p


def parse(p: argparse.ArgumentParser, argv, variants: tuple[str, ...], fractions: tuple[str, ...],
          suffixes: tuple[str, ...] = ()):
    """Parses, splits --lengths / --variants (each a name of `variants`, optionally followed by
    one of `suffixes`), checks that the named fractions lie in [0, 1]."""
    args = p.parse_args(argv)
    args.lengths = [int(x) for x in args.lengths.split(",") if x]
    args.variants = [v for v in args.variants.split(",") if v]

    def base(v):
        return next((v[: -len(x)] for x in suffixes if v.endswith(x)), v)

    bad = sorted({v for v in args.variants if base(v) not in variants})
    if bad:
        p.error(f"unknown variants {bad}; choose from {variants}")
    for name in fractions:
        if not 0.0 <= getattr(args, name) <= 1.0:
            p.error(f"--{name.replace('_', '-')} must be in [0, 1]")
    return args


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
