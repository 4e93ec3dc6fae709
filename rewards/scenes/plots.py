"""Figures of the scenes task: a grid of images per prompt, base against fine-tuned (matplotlib, Agg)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from rewards.scenes.render import SAMPLE_SHAPE

__all__ = ["to_rgb", "plot_scene_grid"]


def to_rgb(x: np.ndarray) -> np.ndarray:
    """Flattened images (n, 768) in [-1, 1] -> (n, 16, 16, 3) in [0, 1] for imshow (clipped)."""
    return np.clip((np.asarray(x, dtype=np.float64).reshape(-1, *SAMPLE_SHAPE).transpose(0, 2, 3, 1) + 1) / 2, 0, 1)


def _rows(x: np.ndarray, valid: np.ndarray, cond: Sequence[str] | None, prompts: list[str], per_row: int
          ) -> list[np.ndarray]:
    """The first ``per_row`` valid images of each prompt (all prompts as one when ``cond`` is None)."""
    keep = np.asarray(valid, dtype=bool)
    if cond is None:
        return [x[np.flatnonzero(keep)[:per_row]]]
    labels = np.asarray(list(cond), dtype=object)
    return [x[np.flatnonzero(keep & (labels == p))[:per_row]] for p in prompts]


def plot_scene_grid(path: str | Path, base_x: np.ndarray, base_valid: np.ndarray, base_cond: Sequence[str] | None,
                    final_x: np.ndarray, final_valid: np.ndarray, final_cond: Sequence[str] | None, *,
                    per_row: int = 8, labels: tuple[str, str] = ("base", "fine-tuned")) -> Path:
    """Write a figure with one row per prompt and two blocks (base | fine-tuned) of ``per_row`` images each."""
    from rewards.plots import pyplot

    plt = pyplot()
    seen = [*(base_cond or []), *(final_cond or [])]
    prompts = list(dict.fromkeys(seen)) if seen else ["samples"]
    blocks = [_rows(np.asarray(base_x), base_valid, base_cond, prompts, per_row),
              _rows(np.asarray(final_x), final_valid, final_cond, prompts, per_row)]
    n_rows = max(len(b) for b in blocks)
    fig, axes = plt.subplots(n_rows, 2 * per_row + 1, figsize=(0.8 * (2 * per_row + 1), 0.9 * n_rows + 0.4),
                             squeeze=False)
    for ax in axes.ravel():
        ax.set_axis_off()
    for b, block in enumerate(blocks):
        for i, images in enumerate(block):
            for j, img in enumerate(to_rgb(images) if len(images) else []):
                axes[i, b * (per_row + 1) + j].imshow(img, interpolation="nearest")
            if b == 0:
                axes[i, 0].set_title(prompts[i] if i < len(prompts) else "", fontsize=7, loc="left")
    fig.suptitle(f"{labels[0]} (left) | {labels[1]} (right)", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
