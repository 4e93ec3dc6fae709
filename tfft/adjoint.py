"""Adjoint Matching (Domingo-Enrich et al., ICLR 2025), the fine-tuning solver for differentiable rewards.

DESIGN.md section 6. Trajectories come from the memoryless SDE of the current model (`tfft.sampling`), without
gradients; the lean adjoint runs backwards with the BASE drift b_base(x, t) = 2 v_base(x, t) - kappa_t x; the loss
regresses the control (2/sigma)(v_theta - v_base) onto -sigma a. Its optimum is p_theta ∝ q exp(g / gamma).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from tfft.model import VelocityField
from tfft.sampling import Trajectory, kappa, sample_sde, sigma

__all__ = ["adjoint_matching_loss", "adjoint_matching_step", "lean_adjoint", "select_time_steps"]

RewardGradFn = Callable[[Tensor], tuple[Tensor, Tensor]]
"""`reward_grad_fn(x1 (n, d)) -> (grad_g (n, d), valid (n,) bool)`: pseudo-reward gradient and validity mask."""


def lean_adjoint(base_velocity: VelocityField, traj: Trajectory, terminal: Tensor) -> Tensor:
    """Lean adjoint a_k = a(t_k), integrated backwards with the base drift (DESIGN.md section 6).

    a_K = terminal;   a_{k-1} = a_k + h VJP_x[b_base(X_k, t_k)](a_k),   b_base(x, t) = 2 v_base(x, t) - kappa_t x,
    i.e. a(t - h) = a(t) + h a(t)^T grad_x b_base(X_t, t). The VJPs are batched over the n samples; the result
    is detached (no graph is kept).

    Args:
        base_velocity: the pretrained v_base(x (n, d), t (n,)) -> (n, d).
        traj: SDE trajectory with xs (K + 1, n, d), ts (K + 1,) and step h.
        terminal: a(1), (n, d); the caller passes -grad g(X_1) / kl_weight.

    Returns:
        Adjoint states, (K + 1, n, d), aligned with traj.xs.
    """
    xs, ts, h = traj.xs, traj.ts, traj.h
    if terminal.shape != xs.shape[1:]:
        raise ValueError(f"terminal must have shape {tuple(xs.shape[1:])}, got {tuple(terminal.shape)}")
    n = xs.shape[1]
    a = terminal.detach().to(dtype=xs.dtype)
    adjoints = [a]
    for k in range(ts.numel() - 1, 0, -1):
        with torch.enable_grad():
            x = xs[k].detach().requires_grad_(True)
            drift = 2.0 * base_velocity(x, ts[k].expand(n)) - kappa(float(ts[k]), h) * x
            (vjp,) = torch.autograd.grad(drift, x, grad_outputs=a)
        a = a + h * vjp.detach()
        adjoints.append(a)
    adjoints.reverse()
    return torch.stack(adjoints)


def select_time_steps(
    steps: int,
    *,
    late_fraction: float = 0.25,
    n_early: int = 10,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Step indices for the Adjoint Matching loss: every late step plus a random subset of the early ones.

    The steps are k = 0, ..., K - 1 (K = `steps`); the late ones are the last ceil(late_fraction K), the early
    subset has min(n_early, number of early steps) distinct indices drawn uniformly (DESIGN.md section 6).

    Returns:
        Sorted LongTensor of distinct indices in [0, K).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not 0.0 <= late_fraction <= 1.0:
        raise ValueError(f"late_fraction must be in [0, 1], got {late_fraction}")
    if n_early < 0:
        raise ValueError(f"n_early must be >= 0, got {n_early}")
    n_late = min(steps, math.ceil(late_fraction * steps))
    first_late = steps - n_late
    if n_late == 0 and min(n_early, first_late) == 0:
        raise ValueError("late_fraction and n_early select no time step")
    device = generator.device if generator is not None else None
    early = torch.randperm(first_late, generator=generator, device=device)[: min(n_early, first_late)]
    late = torch.arange(first_late, steps, device=device)
    return torch.sort(torch.cat([early, late])).values


def adjoint_matching_loss(
    velocity: VelocityField,
    base_velocity: VelocityField,
    traj: Trajectory,
    adjoint: Tensor,
    step_indices: Tensor,
    *,
    sample_mask: Tensor | None = None,
) -> Tensor:
    """Adjoint Matching loss (DESIGN.md section 6), X and a held constant:

    L = (1 / |valid|) sum_{i valid} sum_{k in steps} || (2 / sigma_k)(v_theta(X_k^i, t_k) - v_base(X_k^i, t_k))
                                                           + sigma_k a_k^i ||^2,
    sigma_k = sigma(t_k, h). The sign is a plus because a_K = -grad g / gamma. Both networks are called once on
    the chosen steps flattened to (m n, d); v_base runs without gradients.

    Args:
        velocity: v_theta, trained.
        base_velocity: v_base, frozen.
        traj: trajectory with xs (K + 1, n, d), ts (K + 1,).
        adjoint: lean adjoint, (K + 1, n, d), from `lean_adjoint`.
        step_indices: m indices in [0, K), e.g. from `select_time_steps`.
        sample_mask: optional (n,) bool; False samples (invalid rewards) contribute nothing.

    Returns:
        Scalar loss (zero, still attached to v_theta, when no sample is valid).
    """
    xs, ts, h = traj.xs, traj.ts, traj.h
    if adjoint.shape != xs.shape:
        raise ValueError(f"adjoint must have shape {tuple(xs.shape)}, got {tuple(adjoint.shape)}")
    steps = ts.numel() - 1
    step_indices = torch.as_tensor(step_indices, dtype=torch.long, device=xs.device)
    if step_indices.dim() != 1 or step_indices.numel() == 0:
        raise ValueError("step_indices must be a non-empty 1-D tensor")
    if bool((step_indices < 0).any()) or bool((step_indices >= steps).any()):
        raise ValueError(f"step_indices must lie in [0, {steps})")
    if sample_mask is not None:
        if sample_mask.shape != (xs.shape[1],):
            raise ValueError(f"sample_mask must have shape ({xs.shape[1]},), got {tuple(sample_mask.shape)}")
        # Drop masked-out samples before the network calls: a NaN there must not reach the gradient.
        keep = sample_mask.to(device=xs.device, dtype=torch.bool)
        xs, adjoint = xs[:, keep], adjoint[:, keep]
    m, n, d = step_indices.numel(), xs.shape[1], xs.shape[2]

    x_flat = xs[step_indices].reshape(m * n, d)  # (m n, d)
    t_flat = ts[step_indices].repeat_interleave(n)  # (m n,), matches the row-major flattening
    with torch.no_grad():
        v_base = base_velocity(x_flat, t_flat)
    v_theta = velocity(x_flat, t_flat)
    sigma_k = sigma(ts[step_indices], h).reshape(m, 1, 1)  # (m, 1, 1)
    residual = (2.0 / sigma_k) * (v_theta - v_base).reshape(m, n, d) + sigma_k * adjoint[step_indices]
    per_sample = residual.pow(2).sum(dim=(0, 2))  # (n,)
    # With no valid sample the empty sum is 0 and still attached to v_theta's parameters.
    return per_sample.mean() if n > 0 else per_sample.sum()


def adjoint_matching_step(
    velocity: VelocityField,
    base_velocity: VelocityField,
    x0: Tensor,
    reward_grad_fn: RewardGradFn,
    *,
    kl_weight: float,
    steps: int,
    late_fraction: float = 0.25,
    n_early: int = 10,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, dict[str, Tensor | float]]:
    """One Adjoint Matching loss evaluation on fresh trajectories of the current model (DESIGN.md section 6).

    1. Sample a memoryless-SDE trajectory from `velocity` (no gradients), K = `steps`.
    2. (grad_g, valid) = reward_grad_fn(X_1); a sample whose gradient is not finite counts as invalid; terminal
       adjoint a_K = -grad_g / kl_weight, zero where invalid.
    3. Lean adjoint with `base_velocity`; choose steps; return the loss, invalid samples masked out.

    Args:
        velocity: v_theta, the model being fine-tuned.
        base_velocity: v_base, the frozen pretrained model.
        x0: start noise, (n, d).
        reward_grad_fn: x1 (n, d) -> (grad g (n, d), valid (n,) bool).
        kl_weight: gamma > 0.
        steps: K, SDE steps.
        late_fraction, n_early: time-step subset (`select_time_steps`).
        generator: optional torch.Generator for the SDE noise and the step subset.

    Returns:
        (loss, info) with info["x1"] the samples (n, d), info["valid_fraction"] the fraction of valid rewards and
        info["active_fraction"] the fraction of valid samples whose pseudo-reward gradient is non-zero.
    """
    if not kl_weight > 0:
        raise ValueError(f"kl_weight must be > 0, got {kl_weight}")
    traj = sample_sde(velocity, x0, steps, generator=generator, return_trajectory=True)
    assert isinstance(traj, Trajectory)
    x1 = traj.x1
    grad_g, valid = reward_grad_fn(x1.detach().clone())
    grad_g = grad_g.detach().to(device=x1.device, dtype=x1.dtype)
    valid = valid.to(device=x1.device, dtype=torch.bool)
    if grad_g.shape != x1.shape or valid.shape != (x1.shape[0],):
        raise ValueError(
            f"reward_grad_fn must return ((n, d), (n,)); got {tuple(grad_g.shape)}, {tuple(valid.shape)}"
        )
    valid = valid & torch.isfinite(grad_g).all(dim=1)
    terminal = torch.where(valid[:, None], -grad_g / kl_weight, torch.zeros_like(grad_g))
    adjoint = lean_adjoint(base_velocity, traj, terminal)
    step_indices = select_time_steps(steps, late_fraction=late_fraction, n_early=n_early, generator=generator)
    loss = adjoint_matching_loss(velocity, base_velocity, traj, adjoint, step_indices, sample_mask=valid)
    n_valid = int(valid.sum())
    active = (grad_g[valid] != 0).any(dim=1).sum() if n_valid else torch.tensor(0)
    info: dict[str, Tensor | float] = {
        "x1": x1,
        "valid_fraction": n_valid / x1.shape[0],
        "active_fraction": float(active) / max(n_valid, 1),
    }
    return loss, info
