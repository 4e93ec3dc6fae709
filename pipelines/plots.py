"""Figures written next to a run's results: reward histograms and 2-D sample scatters."""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["plot_rewards", "plot_samples"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_rewards(
    path: str | Path,
    base: np.ndarray,
    finetuned: np.ndarray,
    *,
    eta: float | None,
    side: str,
    alpha: float,
    cvar_base: float,
    cvar_finetuned: float,
    title: str = "",
) -> None:
    """Histograms of valid rewards (base vs fine-tuned) with the threshold eta* and both CVaRs marked."""
    plt = _pyplot()
    base, finetuned = base[np.isfinite(base)], finetuned[np.isfinite(finetuned)]
    both = np.concatenate([base, finetuned])
    bins = np.linspace(both.min(), both.max(), 80) if both.size else 10
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.hist(base, bins=bins, alpha=0.5, density=True, label="base model", color="tab:gray")
    ax.hist(finetuned, bins=bins, alpha=0.5, density=True, label="fine-tuned", color="tab:blue")
    if eta is not None:
        ax.axvline(eta, color="black", linestyle="--", label=f"threshold eta* = {eta:.3g}")
    ax.axvline(cvar_base, color="tab:gray", linestyle=":", label=f"base {side}-CVaR({alpha:g}) = {cvar_base:.3g}")
    ax.axvline(
        cvar_finetuned, color="tab:blue", linestyle=":", label=f"fine-tuned {side}-CVaR({alpha:g}) = {cvar_finetuned:.3g}"
    )
    ax.set_xlabel("reward")
    ax.set_ylabel("density")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
    plt = _pyplot()
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
