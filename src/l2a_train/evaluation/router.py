"""Router analysis: which tokens each L2A layer sends to global attention.

`RouterProbe` hooks the routers of a model's L2A layers and recomputes, from the router's
output z, the decision the layer takes (p = sigmoid(z / tau) >= threshold: the same float32
arithmetic as the layer). Only the first call of each layer after `start()` is kept: the
prefill of a generate call, or the one forward of a perplexity row.

Two summaries:
- routed fraction per layer against context length (retrieval prompts of each length) and
  against token position (perplexity rows, bucketed);
- concentration: the routed fraction of each layer on needle, distractor, question and
  haystack tokens of retrieval prompts, and the lift (region fraction / overall fraction):
  a lift above 1 on needle and question tokens means routing concentrates where retrieval happens.

"global" layers count as always routed, "swa" (and pruned) layers as never; layers with
random routing are left out (their decisions are not a function of the tokens).
"""

from __future__ import annotations

import numpy as np
import torch

from .retrieval import REGIONS


class RouterProbe:
    def __init__(self, model):
        self.config = model.config
        self.layer_types = list(getattr(model.config, "l2a_layer_types", []))
        self.learned = getattr(model.config, "l2a_routing", "learned") == "learned"
        self._hooks = []
        self._current: dict[int, torch.Tensor] = {}
        if self.learned:
            for i, layer in enumerate(model.model.layers):
                if hasattr(layer, "router"):
                    self._hooks.append(layer.router.register_forward_hook(self._hook(i)))
        n = len(self.layer_types)
        self.by_length: dict[int, list[np.ndarray]] = {}  # length -> [routed count, tokens] per layer
        self.by_region = np.zeros((len(REGIONS), n, 2))  # region, layer, (routed, tokens)
        self.by_position: dict[tuple[int, int], np.ndarray] = {}  # bucket -> [layer, (routed, tokens)]

    @property
    def active(self) -> bool:
        return bool(self.layer_types) and (self.learned or "l2a" not in self.layer_types)

    def _hook(self, index: int):
        def hook(module, args, output):
            if index not in self._current:
                tau, threshold = float(self.config.l2a_temperature), float(self.config.l2a_threshold)
                p = torch.sigmoid(output.float() / tau)
                self._current[index] = (p >= threshold).reshape(-1).cpu()

        return hook

    def close(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def start(self) -> None:
        self._current = {}

    def _decisions(self, length: int) -> np.ndarray | None:
        """bool [num_layers, length] of the last recorded forward (one row of a batch)."""
        if not self.active:
            return None
        out = np.zeros((len(self.layer_types), length), dtype=bool)
        for i, kind in enumerate(self.layer_types):
            if kind == "global":
                out[i] = True
            elif kind == "l2a":
                out[i] = self._current[i][:length].numpy()
        return out

    def finish(self, length_key: int, n_tokens: int, regions: np.ndarray | None) -> None:
        """Account the prefill just recorded: a prompt of `n_tokens` (target length `length_key`),
        with each token's region when the tokenizer gives offsets."""
        decisions = self._decisions(n_tokens)
        if decisions is None:
            return
        acc = self.by_length.setdefault(int(length_key), np.zeros((len(self.layer_types), 2)))
        acc[:, 0] += decisions.sum(1)
        acc[:, 1] += n_tokens
        if regions is not None:
            for r in range(len(REGIONS)):
                mask = regions == r
                self.by_region[r, :, 0] += decisions[:, mask].sum(1)
                self.by_region[r, :, 1] += mask.sum()

    def finish_positions(self, positions: np.ndarray, edges: list[int]) -> None:
        """Account a perplexity row: its tokens bucketed by position inside their document."""
        decisions = self._decisions(len(positions))
        if decisions is None:
            return
        for lo, hi in zip(edges[:-1], edges[1:]):
            mask = (positions >= lo) & (positions < hi)
            acc = self.by_position.setdefault((lo, hi), np.zeros((len(self.layer_types), 2)))
            acc[:, 0] += decisions[:, mask].sum(1)
            acc[:, 1] += mask.sum()

    def summary(self) -> dict | None:
        if not self.active:
            return None

        def frac(acc):
            return [float(r / t) if t else None for r, t in acc]

        overall = self.by_region.sum(0)
        result = {
            "layer_types": self.layer_types,
            "by_length": {str(k): frac(v) for k, v in sorted(self.by_length.items())},
            "by_position": {f"{lo}-{hi}": frac(v) for (lo, hi), v in sorted(self.by_position.items())},
            "overall": frac(overall) if overall[:, 1].any() else None,
            "regions": {},
            "lift": {},
        }
        if overall[:, 1].any():
            for r, name in enumerate(REGIONS):
                result["regions"][name] = frac(self.by_region[r])
                result["lift"][name] = [
                    (reg / tot if reg is not None and tot else None)
                    for reg, tot in zip(result["regions"][name], result["overall"])
                ]
            result["region_tokens"] = {name: int(self.by_region[r, 0, 1]) for r, name in enumerate(REGIONS)}
        return result
