"""Figures that rewards draw for their tasks (`rewards.base.Reward.figures`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["plot_samples", "pyplot"]


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display on workers and CI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_samples(
    path: str | Path,
    base_x: np.ndarray,
    finetuned_x: np.ndarray,
    base_r: np.ndarray,
    finetuned_r: np.ndarray,
    *,
    title: str = "",
    max_points: int = 5000,
) -> None:
    """Side-by-side 2-D scatters of base and fine-tuned samples, coloured by reward (2-D tasks)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6), sharex=True, sharey=True)
    finite = np.concatenate([base_r[np.isfinite(base_r)], finetuned_r[np.isfinite(finetuned_r)]])
    vmin, vmax = (np.percentile(finite, 1), np.percentile(finite, 99.5)) if finite.size else (0, 1)
    for ax, x, r, name in ((axes[0], base_x, base_r, "base model"), (axes[1], finetuned_x, finetuned_r, "fine-tuned")):
        x, r = x[:max_points], r[:max_points]
        sc = ax.scatter(x[:, 0], x[:, 1], c=r, s=3, cmap="viridis", vmin=vmin, vmax=vmax)
        ax.set_title(name)
        ax.set_aspect("equal")
    fig.colorbar(sc, ax=axes, label="reward", shrink=0.85)
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
    plt.close(fig)
