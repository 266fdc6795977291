"""Eval results -> Markdown tables and PNG plots (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

from .perplexity import label


def _f(x, digits=3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def markdown(results: dict) -> str:
    m = results["model"]
    kinds = m["layer_types"]
    lines = [
        f"# Evaluation of `{m['path']}`",
        "",
        f"{m['model_type']} ({m['source']}), {len(kinds)} layers: {kinds.count('l2a')} l2a, {kinds.count('swa')} swa, "
        f"{kinds.count('global')} global; window {m['window']}; {m['max_positions']} positions. "
        f"KV cache at {label(m['kv_length'])} tokens (bf16, batch 1): {m['kv_cache_bytes'] / 2**20:.1f} MiB "
        f"({100 * m['kv_cache_vs_full']:.1f}% of full attention).",
    ]
    ppl = results.get("perplexity")
    if ppl:
        lines += ["", f"## Perplexity by position ({ppl['rows']} held-out rows of {ppl['seq_len']} tokens)", ""]
        rows = [[b["bucket"], str(b["tokens"]), _f(b["nll"]), _f(b["ppl"], 2)] for b in ppl["buckets"]]
        rows.append(["all", str(ppl["all"]["tokens"]), _f(ppl["all"]["nll"]), _f(ppl["all"]["ppl"], 2)])
        lines += _table(["positions", "tokens", "nll", "perplexity"], rows)
    ret = results.get("retrieval")
    if ret:
        lengths = ret["lengths"]
        lines += ["", "## Retrieval accuracy by task and length (mean over depths)", ""]
        rows = [[name, *[_f(t["by_length"][str(L)]) for L in lengths], _f(t["accuracy"])] for name, t in ret["tasks"].items()]
        rows.append(["mean", *[_f(sum(t["by_length"][str(L)] for t in ret["tasks"].values()) / len(ret["tasks"])) for L in lengths],
                     _f(ret["accuracy"])])
        lines += _table(["task", *[label(L) for L in lengths], "all"], rows)
        for name, t in ret["tasks"].items():
            lines += ["", f"### {name}: accuracy by needle depth x length", ""]
            acc = {(c["depth"], c["length"]): c["accuracy"] for c in t["cells"]}
            rows = [[f"{d:.2f}", *[_f(acc[(d, L)]) for L in lengths]] for d in ret["depths"]]
            lines += _table(["depth", *[label(L) for L in lengths]], rows)
    router = results.get("router")
    if router:
        lines += ["", "## Routed fraction per layer", ""]
        by_len = router["by_length"]
        by_pos = router["by_position"]
        lifts = router.get("lift") or {}
        header = ["layer", "type", *[f"len {label(int(L))}" for L in by_len], *[f"pos {k}" for k in by_pos],
                  *[f"lift {r}" for r in ("needle", "question", "distractor") if r in lifts]]
        rows = []
        for i, kind in enumerate(router["layer_types"]):
            rows.append([str(i), kind, *[_f(v[i]) for v in by_len.values()], *[_f(v[i]) for v in by_pos.values()],
                         *[_f(lifts[r][i], 2) for r in ("needle", "question", "distractor") if r in lifts]])
        lines += _table(header, rows)
        if lifts:
            lines += ["", "lift = routed fraction on that region's tokens / on all prompt tokens (> 1: routing "
                      f"concentrates there); region tokens: {router['region_tokens']}"]
    elif results.get("router_note"):
        lines += ["", "## Routed fraction per layer", "", results["router_note"]]
    return "\n".join(lines) + "\n"


def plots(results: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    written = []
    ret = results.get("retrieval")
    if ret:
        names = list(ret["tasks"])
        fig, axes = plt.subplots(1, len(names), figsize=(2.6 * len(names) + 1.2, 3.2), squeeze=False, constrained_layout=True)
        for ax, name in zip(axes[0], names):
            acc = {(c["depth"], c["length"]): c["accuracy"] for c in ret["tasks"][name]["cells"]}
            grid = np.array([[acc[(d, L)] for L in ret["lengths"]] for d in ret["depths"]])
            im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
            ax.set_xticks(range(len(ret["lengths"])), [label(L) for L in ret["lengths"]])
            ax.set_yticks(range(len(ret["depths"])), [f"{d:.2f}" for d in ret["depths"]])
            ax.set_xlabel("context length")
            ax.set_title(name)
            for (y, x), v in np.ndenumerate(grid):
                ax.text(x, y, f"{v:.2f}", ha="center", va="center", fontsize=7)
        axes[0][0].set_ylabel("needle depth")
        fig.colorbar(im, ax=axes[0].tolist(), shrink=0.9, label="accuracy")
        fig.savefig(out / "retrieval_heatmap.png", dpi=120)
        plt.close(fig)
        written.append("retrieval_heatmap.png")
    router = results.get("router")
    if router and (router["by_length"] or router["by_position"]):
        n = len(router["layer_types"])
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
        x = np.arange(n)
        for ax in axes:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        for name, series in [*((f"len {label(int(k))}", v) for k, v in router["by_length"].items()),
                             *((f"pos {k}", v) for k, v in router["by_position"].items())]:
            axes[0].plot(x, [np.nan if v is None else v for v in series], marker="o", ms=3, label=name)
        axes[0].set(xlabel="layer", ylabel="routed fraction", ylim=(-0.02, 1.02), title="routed fraction per layer")
        axes[0].legend(fontsize=7)
        if router.get("regions"):
            for name, series in router["regions"].items():
                axes[1].plot(x, [np.nan if v is None else v for v in series], marker="o", ms=3, label=name)
            axes[1].set(xlabel="layer", ylabel="routed fraction", ylim=(-0.02, 1.02),
                        title="by token region (retrieval prompts)")
            axes[1].legend(fontsize=7)
        else:
            axes[1].axis("off")
        fig.tight_layout()
        fig.savefig(out / "routed_fraction.png", dpi=120)
        plt.close(fig)
        written.append("routed_fraction.png")
    return written
