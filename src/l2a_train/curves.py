"""Loss and sparsity curves of one or several runs, from their metrics.jsonl.

    l2a-plot runs/quickstart --out curves.png
    l2a-plot runs/sweep/* --out sweep.png --smooth 20

Top row: LM loss and skip rate (fraction of tokens skipping global attention in L2A layers)
against tokens seen, one line per run. Below: for each run, a heat map of the routed fraction
of every layer over training. The trainer writes `curves.png` into the run directory at the end; `l2a-plot` (`l2a_train.cli.plot`)
draws it for any runs.
"""

from __future__ import annotations

from pathlib import Path

from .training.metrics import read_metrics


def _smooth(values, window: int):
    if window <= 1 or len(values) < 2:
        return values
    out, acc = [], 0.0
    for i, v in enumerate(values):  # trailing mean, so the curve never looks ahead
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def _label(run_dir: Path, runs: list[Path]) -> str:
    if len(runs) == 1:
        return run_dir.name
    common = Path(*Path(runs[0]).parts[: len(Path(runs[0]).parts) - 1])
    try:
        return str(run_dir.relative_to(common))
    except ValueError:
        return str(run_dir)


def plot_runs(run_dirs, out, smooth: int = 1, title: str | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [Path(r) for r in run_dirs]
    data = [(r, [m for m in read_metrics(r) if m.get("lm_loss") is not None]) for r in runs]
    data = [(r, m) for r, m in data if m]
    if not data:
        raise FileNotFoundError(f"no metrics.jsonl with data in: {', '.join(map(str, runs))}")
    heat = [(r, m) for r, m in data if m[-1].get("routed_per_layer")]
    fig = plt.figure(figsize=(11, 3.6 + 2.4 * len(heat)), constrained_layout=True)
    grid = fig.add_gridspec(1 + len(heat), 2, height_ratios=[1.4] + [1.0] * len(heat))
    ax_loss, ax_skip = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1])
    for run, metrics in data:
        label = _label(run, runs)
        x = [m.get("tokens", m["step"]) for m in metrics]
        ax_loss.plot(x, _smooth([m["lm_loss"] for m in metrics], smooth), label=label)
        skip = [(xi, m["skip_rate"]) for xi, m in zip(x, metrics) if m.get("skip_rate") is not None]
        if skip:
            ax_skip.plot([s[0] for s in skip], _smooth([s[1] for s in skip], smooth), label=label)
    xlabel = "tokens seen" if "tokens" in data[0][1][0] else "step"
    ax_loss.set(xlabel=xlabel, ylabel="LM loss", title="language-model loss")
    ax_skip.set(xlabel=xlabel, ylabel="skip rate", title="tokens skipping global attention", ylim=(-0.02, 1.02))
    for ax in (ax_loss, ax_skip):
        ax.grid(alpha=0.3)
    if len(data) > 1:
        ax_loss.legend(fontsize=8)
    for row, (run, metrics) in enumerate(heat, start=1):
        ax = fig.add_subplot(grid[row, :])
        rows = [m for m in metrics if m.get("routed_per_layer")]
        matrix = [[m["routed_per_layer"][i] for m in rows] for i in range(len(rows[0]["routed_per_layer"]))]
        steps = [m["step"] for m in rows]
        image = ax.imshow(matrix, aspect="auto", origin="lower", cmap="viridis", vmin=0.0, vmax=1.0,
                          extent=(steps[0] - 0.5, steps[-1] + 0.5, -0.5, len(matrix) - 0.5), interpolation="nearest")
        ax.set(xlabel="step", ylabel="layer", title=f"routed fraction per layer: {_label(run, runs)}")
        fig.colorbar(image, ax=ax, fraction=0.025, pad=0.01)
    if title:
        fig.suptitle(title)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
