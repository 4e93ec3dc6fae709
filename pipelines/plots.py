"""The figure every run writes next to its results: the reward histograms (task figures: `Reward.figures`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rewards.plots import pyplot

__all__ = ["plot_rewards"]


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
    plt = pyplot()
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
