"""The two fine-tuning solvers behind one interface: ``solver.step(n, generator) -> StepResult``.

- `AdjointMatchingSolver` (DESIGN.md section 6), for rewards with gradients: fresh SDE trajectories of the current
  model, the pseudo-reward gradient at X_1, the lean adjoint with the base drift, the conditioned regression.
- `WeightedFlowMatchingSolver` (DESIGN.md section 7), for rewards without gradients: flow matching on bank
  samples drawn by the frozen tilt weights w_i ∝ exp(g(x_i) / gamma).

A step returns the loss (attached to the model's parameters) and detached diagnostics as 0-dim tensors, so that
a training loop can accumulate them without a host synchronisation and all-reduce them in one call. The caller
owns the optimiser, gradient clipping and distribution.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from tfft.adjoint import Conditioning, adjoint_matching_loss, girsanov_kl, lean_adjoint, select_time_steps
from tfft.model import VelocityField, flow_matching_loss
from tfft.pseudo import PseudoReward
from tfft.sampling import Trajectory, sample_sde

__all__ = [
    "AdjointMatchingConfig",
    "AdjointMatchingSolver",
    "StepResult",
    "WeightedFlowMatchingSolver",
    "oversample_weights",
]

PseudoRewardFn = Callable[[Tensor], PseudoReward]
"""``fn(x1 (n, d)) -> PseudoReward``: g, grad g and validity at the trajectories' end points."""


@dataclass(frozen=True)
class StepResult:
    """One solver step: ``loss`` (scalar, attached) and ``metrics`` (name -> detached 0-dim tensor)."""

    loss: Tensor
    metrics: dict[str, Tensor]


@dataclass(frozen=True)
class AdjointMatchingConfig:
    """Settings of `AdjointMatchingSolver`.

    Attributes:
        kl_weight: gamma > 0.
        steps: K, SDE steps of the training trajectories (use the bank's sampler's K).
        offset: the SDE's offset h (None: 1/K).
        late_fraction, n_early: the loss's time steps (`select_time_steps`).
        normalize: per-step normalisation of the regression (`Conditioning`); off by default: it shifts the
            gradient's weight to the last steps and slowed fine-tuning on the 2-D task.
        clip_quantile, clip_factor: per-sample target clip at clip_factor times this running quantile of the
            non-zero targets (clip_quantile 0: off).
        decay: decay of the running statistics.
        oversample: draw ``oversample * n`` trajectories and keep every active one (up to half the batch) and
            a random subset of the inactive ones, Horvitz-Thompson weighted (1 = off; `oversample_weights`).
    """

    kl_weight: float
    steps: int
    offset: float | None = None
    late_fraction: float = 0.25
    n_early: int = 10
    normalize: bool = False
    clip_quantile: float = 0.9
    clip_factor: float = 2.0
    decay: float = 0.9
    oversample: int = 1

    def __post_init__(self) -> None:
        if not self.kl_weight > 0:
            raise ValueError(f"kl_weight must be > 0, got {self.kl_weight}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.oversample < 1:
            raise ValueError(f"oversample must be >= 1, got {self.oversample}")


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


def _subset(traj: Trajectory, index: Tensor) -> Trajectory:
    velocities = None if traj.velocities is None else traj.velocities[:, index]
    return Trajectory(xs=traj.xs[:, index], ts=traj.ts, h=traj.h, offset=traj.offset, velocities=velocities)


class AdjointMatchingSolver:
    """Adjoint Matching with the conditioned regression (DESIGN.md section 6).

    Args:
        model: v_theta (trained; may be a DDP wrapper).
        base: v_base (frozen).
        pseudo_reward_fn: x1 (n, d) -> `PseudoReward` (e.g. `tfft.pseudo.pseudo_reward_signal` of the reward).
        config: `AdjointMatchingConfig`.

    ``step`` metrics (means over the batch's valid samples, with the oversampling weights):
        loss, loss_at_base (its value at v_theta = v_base; the ratio of the two, summed over a window, shows
        progress: the loss value itself is mostly irreducible noise), delta_v (||v_theta - v_base||^2), max_share
        (largest per-sample share of the loss), loss_ess (effective sample size of the per-sample losses),
        clipped_fraction, valid_fraction, active_fraction (of the pool), mean_reward, pseudo_reward (E g),
        kl (Girsanov), objective (E g - gamma KL: what fine-tuning maximises), batch (trajectories in the loss).
    """

    def __init__(
        self, model: VelocityField, base: VelocityField, pseudo_reward_fn: PseudoRewardFn, config: AdjointMatchingConfig
    ) -> None:
        self.model, self.base, self.pseudo_reward_fn, self.config = model, base, pseudo_reward_fn, config
        self.conditioning = Conditioning(
            config.steps, normalize=config.normalize, clip_quantile=config.clip_quantile,
            clip_factor=config.clip_factor, decay=config.decay,
        )

    def step(self, x0: Tensor, generator: torch.Generator | None = None) -> StepResult:
        """One loss on fresh trajectories started at x0 (n, d) (``oversample * n`` rows when oversampling)."""
        cfg = self.config
        traj = sample_sde(self.model, x0, cfg.steps, offset=cfg.offset, generator=generator, return_trajectory=True)
        assert isinstance(traj, Trajectory)
        signal = self.pseudo_reward_fn(traj.x1.detach().clone())
        n_pool = x0.shape[0]
        if signal.grad.shape != traj.x1.shape or signal.valid.shape != (n_pool,):
            raise ValueError(
                f"pseudo_reward_fn must return grad (n, d) and valid (n,); got {tuple(signal.grad.shape)}, "
                f"{tuple(signal.valid.shape)}"
            )
        device, dtype = traj.xs.device, traj.xs.dtype
        valid = signal.valid.to(device=device, dtype=torch.bool)
        active = signal.active.to(device=device)
        if cfg.oversample > 1:
            weights = oversample_weights(active, valid, n_pool // cfg.oversample, generator=generator)
        else:
            n_valid = max(int(valid.sum()), 1)
            weights = valid.to(torch.float64).cpu() / n_valid
        keep = torch.nonzero(weights > 0).flatten().to(device)
        w = weights.to(device=device, dtype=dtype)[keep]
        sub = _subset(traj, keep)
        grad = signal.grad.to(device=device, dtype=dtype)[keep]
        terminal = -grad / cfg.kl_weight
        adjoint = lean_adjoint(self.base, sub, terminal)
        indices = select_time_steps(cfg.steps, late_fraction=cfg.late_fraction, n_early=cfg.n_early, generator=generator)
        terms = adjoint_matching_loss(self.model, sub, adjoint, indices, sample_weights=w, conditioning=self.conditioning)
        with torch.no_grad():
            total = w.sum().clamp_min(1e-30)
            kl = (girsanov_kl(sub, adjoint) * w).sum() / total
            g = (signal.value.to(device=device, dtype=dtype)[keep] * w).sum() / total
            reward = torch.nan_to_num(signal.reward.to(device=device, dtype=dtype)[keep])
            contrib = terms.per_sample[terms.per_sample > 0]
            loss_sum = contrib.sum()
            metrics = {
                "loss": terms.loss.detach(),
                "loss_at_base": terms.loss_at_base,
                "delta_v": terms.delta_v,
                "max_share": contrib.max() / loss_sum if contrib.numel() else loss_sum,
                "loss_ess": loss_sum.pow(2) / contrib.pow(2).sum() if contrib.numel() else loss_sum,
                "clipped_fraction": terms.clipped_fraction,
                "valid_fraction": valid.to(dtype).mean(),
                "active_fraction": active.to(dtype).sum() / valid.to(dtype).sum().clamp_min(1.0),
                "mean_reward": (reward * w).sum() / total,
                "pseudo_reward": g,
                "kl": kl,
                "objective": g - cfg.kl_weight * kl,
                "batch": torch.tensor(float(keep.numel()), dtype=dtype, device=device),
            }
        return StepResult(terms.loss, metrics)

    def state_dict(self) -> dict[str, Tensor]:
        """Running conditioning statistics (save them with the model's checkpoint)."""
        return self.conditioning.state_dict()

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore `state_dict()`."""
        self.conditioning.load_state_dict(state)


class WeightedFlowMatchingSolver:
    """Weighted flow matching on a bank (DESIGN.md section 7): each step draws n bank samples with probabilities
    w_i ∝ exp(g(x_i) / gamma) (with replacement) and takes the plain flow-matching loss on them, whose expectation
    is the weighted loss sum_i w_i || v_theta(x_t, t) - (x_i - x0) ||^2.

    Args:
        model: v_theta.
        bank_x: bank samples, (N, d).
        bank_weights: non-negative weights, (N,) (normalised here).

    ``step`` metrics: loss, weights_ess (ESS of the frozen weights), batch.
    """

    def __init__(self, model: VelocityField, bank_x: Tensor, bank_weights: Tensor) -> None:
        if bank_x.dim() != 2 or bank_weights.shape != (bank_x.shape[0],):
            raise ValueError(
                f"bank_x must be (N, d) and bank_weights (N,); got {tuple(bank_x.shape)}, {tuple(bank_weights.shape)}"
            )
        w = bank_weights.detach().to(torch.float64).cpu()
        if not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or not float(w.sum()) > 0:
            raise ValueError("bank_weights must be finite, non-negative and not all zero")
        self.model, self.bank_x, self.weights = model, bank_x, w / w.sum()
        self.ess = float(1.0 / self.weights.pow(2).sum())

    def step(self, n: int, generator: torch.Generator | None = None, index_generator: torch.Generator | None = None) -> StepResult:
        """Flow-matching loss on n bank samples drawn by weight; `index_generator` (CPU) draws the rows."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        idx = torch.multinomial(self.weights, n, replacement=True, generator=index_generator)
        x1 = self.bank_x[idx.to(self.bank_x.device)]
        loss = flow_matching_loss(self.model, x1, generator=generator)
        dtype, device = loss.dtype, loss.device
        metrics = {
            "loss": loss.detach(),
            "weights_ess": torch.tensor(self.ess, dtype=dtype, device=device),
            "batch": torch.tensor(float(n), dtype=dtype, device=device),
        }
        return StepResult(loss, metrics)

    def state_dict(self) -> dict[str, Tensor]:
        """No running state."""
        return {}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Nothing to restore."""
        if state:
            raise ValueError(f"weighted flow matching has no state, got keys {sorted(state)}")
