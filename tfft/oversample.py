"""Importance oversampling of tail trajectories with Horvitz-Thompson weights (DESIGN.md section 6)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["oversample_weights"]


def oversample_weights(active: Tensor, valid: Tensor, n: int, generator: torch.Generator | None = None) -> Tensor:
    """Horvitz-Thompson weights that keep about n of a pool of N trajectories, favouring active ones.

    Active trajectories are kept with probability p_a = min(1, (n/2) / #active), the other valid ones with
    p_i = min(1, (n - p_a #active) / #inactive); a kept trajectory gets weight 1 / (N_valid p), a dropped or
    invalid one 0. Then sum_i w_i f_i is an unbiased estimate of the valid pool's mean of f, for any f.

    Args:
        active, valid: (N,) bool masks (active implies valid).
        n: the batch size to aim for.

    Returns:
        (N,) float64 weights.
    """
    if active.shape != valid.shape or active.dim() != 1:
        raise ValueError(f"active and valid must be (N,) masks; got {tuple(active.shape)}, {tuple(valid.shape)}")
    active = active & valid
    inactive = valid & ~active
    n_valid, n_active, n_inactive = int(valid.sum()), int(active.sum()), int(inactive.sum())
    weights = torch.zeros(active.shape, dtype=torch.float64)
    if n_valid == 0:
        return weights
    p_a = min(1.0, 0.5 * n / n_active) if n_active else 0.0
    p_i = min(1.0, max(n - p_a * n_active, 0.0) / n_inactive) if n_inactive else 0.0
    draw = torch.rand(active.shape, generator=generator, device=generator.device if generator else None).cpu()
    keep_p = torch.where(active.cpu(), torch.tensor(p_a, dtype=torch.float64), torch.tensor(p_i, dtype=torch.float64))
    keep = valid.cpu() & (draw.to(torch.float64) < keep_p)
    weights[keep] = 1.0 / (n_valid * keep_p[keep])
    return weights
