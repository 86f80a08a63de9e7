"""Training curves like the paper's Figures 3, 4 and 6: chosen and rejected rewards, their margin, the
per-sample gradient scale (and loss, accuracy) over steps, with mini-batch boundaries (reference swaps)
marked. Reads the metrics JSONL; writes a PNG (temporary name, then renamed)."""

from __future__ import annotations

from pathlib import Path

from tso.io import atomic_file
from tso.train.metrics import boundary_steps, read_steps


def plot_training(metrics_path: str | Path, out_path: str | Path | None = None, title: str | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics_path = Path(metrics_path)
    steps = read_steps(metrics_path)
    if not steps:
        raise ValueError(f"{metrics_path}: no step records to plot")
    out_path = Path(out_path) if out_path else metrics_path.with_suffix(".png")
    x = [r["step"] for r in steps]
    def col(key):
        return [r.get(key) if r.get(key) is not None else float("nan") for r in steps]

    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    ax = axes[0][0]
    ax.plot(x, col("reward_chosen"), label="chosen reward $r_w$", color="tab:green")
    ax.plot(x, col("reward_rejected"), label="rejected reward $r_l$", color="tab:red")
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_title("rewards (Fig. 3/4)")
    ax.legend(loc="best", fontsize=8)
    ax = axes[0][1]
    ax.plot(x, col("margin"), color="tab:blue")
    ax.set_title("margin $r_w - r_l$")
    ax = axes[1][0]
    ax.plot(x, col("grad_scale"), color="tab:purple")
    ax.axhline(0.5, color="grey", lw=0.5, ls=":")
    ax.set_title(r"gradient scale $\sigma(r_l - r_w)$ (Fig. 6)")
    ax = axes[1][1]
    ax.plot(x, col("loss"), color="black", label="loss")
    ax2 = ax.twinx()
    ax2.plot(x, col("accuracy"), color="tab:orange", alpha=0.6, label="accuracy")
    ax2.set_ylim(-0.05, 1.05)
    ax.set_title("loss (black) and accuracy (orange)")
    bounds = boundary_steps(steps)
    for row in axes:
        for a in row:
            for b in bounds:
                a.axvline(b + 0.5, color="grey", ls="--", lw=0.8)
            a.grid(alpha=0.3)
    for a in axes[1]:
        a.set_xlabel("optimizer step (dashed: mini-batch boundary, reference swapped)")
    fig.suptitle(title or str(metrics_path.parent.name))
    fig.tight_layout()
    with atomic_file(out_path, ".png") as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return out_path


def plot_loss(metrics_path: str | Path, out_path: str | Path, title: str = "loss") -> Path:
    """A single loss-over-steps panel (judge fine-tuning)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = read_steps(metrics_path)
    if not steps:
        raise ValueError(f"{metrics_path}: no step records to plot")
    out_path = Path(out_path)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in steps], [r["loss"] for r in steps], color="black")
    epochs = [p["step"] for p, c in zip(steps, steps[1:]) if c.get("epoch") != p.get("epoch")]
    for b in epochs:
        ax.axvline(b + 0.5, color="grey", ls="--", lw=0.8)
    ax.set_xlabel("optimizer step (dashed: epoch end)")
    ax.set_ylabel("answer-token NLL")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_file(out_path, ".png") as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return out_path
