"""The adjoint solver's detached step diagnostics (`tfft.solvers.AdjointMatchingSolver`'s ``step`` metrics).

Every metric is a 0-dim tensor computed without a host synchronisation (no boolean indexing, no ``.item()``), so
that a training loop can accumulate them and all-reduce them in one call. Means are over the batch's kept
trajectories with their weights w (the oversampling's Horvitz-Thompson weights, or 1 / #valid).
"""

from __future__ import annotations

import torch
from torch import Tensor

from tfft.adjoint import girsanov_kl_estimate, step_weights
from tfft.matching import LossTerms
from tfft.pseudo import PseudoReward
from tfft.sampling import Trajectory

__all__ = ["step_metrics"]


@torch.no_grad()
def step_metrics(
    signal: PseudoReward, sub: Trajectory, keep: Tensor, w: Tensor, v_base: Tensor, indices: Tensor,
    terms: LossTerms, valid: Tensor, active: Tensor, *, kl_weight: float, steps: int, late_fraction: float,
) -> dict[str, Tensor]:
    """The step's metrics (`AdjointMatchingSolver`'s docstring lists them), except ``path_ess``.

    Args:
        signal: the pseudo-reward of the whole pool (N rows).
        sub: the kept trajectories (n of them), with their recorded velocities (K, n, d).
        keep: their rows in the pool, (n,); w: their weights, (n,).
        v_base: v_base(X_k, t_k) at the chosen steps, (m, n, d); indices: those steps k, (m,).
        terms: the loss's terms (`tfft.matching.LossTerms`).
        valid, active: the pool's masks, (N,).
        kl_weight, steps, late_fraction: gamma, K and the late fraction of `AdjointMatchingConfig`.

    The KL is Girsanov's estimate on the chosen steps (`tfft.adjoint.girsanov_kl_estimate`), and
    objective = E g - gamma KL.
    """
    device, dtype = w.device, w.dtype
    total = w.sum().clamp_min(1e-30)
    assert sub.velocities is not None
    kl_steps = girsanov_kl_estimate(
        sub.velocities[indices], v_base, indices, step_weights(indices, steps, late_fraction=late_fraction),
        h=sub.h, offset=sub.offset,
    )
    kl = (kl_steps * w).sum() / total
    g = (signal.value.to(device=device, dtype=dtype)[keep] * w).sum() / total
    reward = torch.nan_to_num(signal.reward.to(device=device, dtype=dtype)[keep])
    shares = terms.per_sample.clamp_min(0.0)  # no boolean indexing: no host sync
    loss_sum = shares.sum()
    positive = loss_sum > 0
    metrics = {
        "loss": terms.loss.detach(),
        "loss_at_base": terms.loss_at_base,
        "delta_v": terms.delta_v,
        "max_share": torch.where(positive, shares.max() / loss_sum.clamp_min(1e-300), loss_sum),
        "loss_ess": torch.where(positive, loss_sum.pow(2) / shares.pow(2).sum().clamp_min(1e-300), loss_sum),
        "clipped_fraction": terms.clipped_fraction,
        "valid_fraction": valid.to(dtype).mean(),
        "active_fraction": active.to(dtype).sum() / valid.to(dtype).sum().clamp_min(1.0),
        "mean_reward": (reward * w).sum() / total,
        "pseudo_reward": g,
        "kl": kl,
        "objective": g - kl_weight * kl,
        "batch": torch.tensor(float(keep.numel()), dtype=dtype, device=device),
    }
    return metrics
