"""Adjoint Matching (Domingo-Enrich et al., ICLR 2025) for the law-preserving SDE of `tfft.sampling`: the adjoint.

DESIGN.md section 6. Trajectories come from the SDE of the current model without gradients; the lean adjoint
is the exact discrete adjoint of that Euler-Maruyama recursion with the BASE drift (:func:`lean_adjoint`). This
module also holds what the loss takes from a trajectory: the control u_k = (lambda_k / sigma_k)(v_theta - v_base)
(:func:`control`), the path KL by Girsanov (:func:`girsanov_kl`, and from the loss's steps only
:func:`girsanov_kl_estimate`) and the loss's time steps (:func:`select_time_steps`, :func:`step_weights`). The
regression itself is `tfft.matching`; its conditioning `tfft.conditioning`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from tfft.conditions import call_velocity
from tfft.model import VelocityField
from tfft.sampling import Trajectory, sigma, step_coefficients, velocity_gain

__all__ = ["Adjoint", "control", "girsanov_kl", "girsanov_kl_estimate", "lean_adjoint", "select_time_steps", "step_weights"]


@dataclass(frozen=True)
class Adjoint:
    """The lean adjoint along a trajectory.

    Attributes:
        states: a_k, (K + 1, n, d), aligned with `Trajectory.xs`; a_K = the terminal value.
        base_velocities: v_base(X_k, t_k) for k < K, (K, n, d): computed on the way, reused by the loss and KL.
    """

    states: Tensor
    base_velocities: Tensor


def lean_adjoint(base_velocity: VelocityField, traj: Trajectory, terminal: Tensor, *, chunk: int = 0) -> Adjoint:
    """Exact discrete adjoint of the sampler's recursion with the base drift (DESIGN.md section 6).

        a_K = terminal,   a_k = a_{k+1} + h_K VJP_x[b_base(X_k, t_k)](a_{k+1}),   k = K - 1, ..., 0,

    b_base = lambda(t) v_base - x / (t + offset). The Jacobian is taken at (X_k, t_k), the point where the sampler
    evaluated step k, so a_k = d(a_K . X_K)/dX_k along the base model's deterministic Euler chain. The VJPs are
    batched over the n samples; nothing is kept in the autograd graph. With conditions (``traj.cond``) each row's
    base velocity is its own condition's, v_base(x, t, c_i).

    Args:
        base_velocity: the pretrained v_base(x (n, d), t (n,)) -> (n, d).
        traj: trajectory with xs (K + 1, n, d), ts (K + 1,), step h and offset.
        terminal: a_K, (n, d); the caller passes -grad g(X_K) / gamma.
        chunk: rows per vector-Jacobian product (0: all n at once). The same numbers; a large network keeps the
            activations of ``chunk`` rows alive instead of n.

    Returns:
        `Adjoint` with states (K + 1, n, d) and base velocities (K, n, d).
    """
    xs = traj.xs
    if terminal.shape != xs.shape[1:]:
        raise ValueError(f"terminal must have shape {tuple(xs.shape[1:])}, got {tuple(terminal.shape)}")
    steps, n = traj.steps, xs.shape[1]
    c_x, c_v, _ = step_coefficients(steps, traj.offset)
    states = torch.empty_like(xs)
    base_velocities = torch.empty((steps, *xs.shape[1:]), device=xs.device, dtype=xs.dtype)
    states[steps] = terminal.detach().to(dtype=xs.dtype)
    if chunk < 0:
        raise ValueError(f"chunk must be >= 0, got {chunk}")
    blocks = [slice(i, min(n, i + chunk)) for i in range(0, n, chunk)] if 0 < chunk < n else [slice(0, n)]
    for k in range(steps - 1, -1, -1):
        # b = lambda v - kappa x, so a_k = (1 - h kappa) a_{k+1} + h lambda J_v^T a_{k+1} = c_x a + c_v J_v^T a
        for rows in blocks:
            a = states[k + 1, rows]
            with torch.enable_grad():
                x = xs[k, rows].detach().requires_grad_(True)
                cond = None if traj.cond is None else traj.cond[rows]
                v_base = call_velocity(base_velocity, x, traj.ts[k].expand(x.shape[0]), cond)
                (vjp,) = torch.autograd.grad(v_base, x, grad_outputs=a)
            torch.mul(a, c_x[k], out=states[k, rows]).add_(vjp, alpha=c_v[k])
            base_velocities[k, rows] = v_base.detach()
            del v_base, vjp, x  # a chunk's activations go before the next chunk's
    return Adjoint(states=states, base_velocities=base_velocities)


def control(traj: Trajectory, velocity: Tensor, base_velocity: Tensor, step_indices: Tensor) -> Tensor:
    """u_k = (lambda_k / sigma_k)(v_theta - v_base), (m, n, d), for velocities (m, n, d) at the chosen steps."""
    t = step_indices.to(dtype=traj.xs.dtype) * traj.h
    gain = (velocity_gain(t, traj.offset) / sigma(t, traj.offset)).reshape(-1, 1, 1)
    return gain * (velocity - base_velocity)


def girsanov_kl(traj: Trajectory, adjoint: Adjoint) -> Tensor:
    """Per-sample KL(p_theta || q) along the path, sum_k h ||u_k||^2 / 2 over all K steps, (n,) (DESIGN §6).

    Uses the velocities recorded by the sampler and by the adjoint: no network call.
    """
    if traj.velocities is None:
        raise ValueError("the trajectory has no recorded velocities (sample_sde(..., return_trajectory=True))")
    steps = torch.arange(traj.steps, device=traj.xs.device)
    u = control(traj, traj.velocities, adjoint.base_velocities, steps)
    return 0.5 * traj.h * u.pow(2).sum(dim=(0, 2))


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


def girsanov_kl_estimate(
    velocities: Tensor, base_velocities: Tensor, step_indices: Tensor, step_weights: Tensor, *, h: float, offset: float
) -> Tensor:
    """Per-sample path KL sum_k h ||u_k||^2 / 2 estimated from the chosen steps only, (n,).

    sum_j step_weights[j] h ||u_{k_j}||^2 / 2 with velocities (m, n, d) at the chosen steps; with the weights of
    `step_weights` (late steps 1, the early subset #early / #chosen-early) it is unbiased for `girsanov_kl`.
    """
    t = step_indices.to(device=velocities.device, dtype=velocities.dtype) * h
    gain = (velocity_gain(t, offset) / sigma(t, offset)).reshape(-1, 1)
    energy = (velocities - base_velocities).pow(2).sum(dim=2) * gain.pow(2)  # (m, n)
    return 0.5 * h * (energy * step_weights.to(energy).reshape(-1, 1)).sum(dim=0)


def step_weights(step_indices: Tensor, steps: int, *, late_fraction: float = 0.25) -> Tensor:
    """Weights that make a sum over `select_time_steps`'s indices unbiased for the sum over all K steps, (m,).

    The late steps (all chosen) weigh 1; each chosen early step weighs #early steps / #chosen early steps.
    """
    first_late = steps - min(steps, math.ceil(late_fraction * steps))
    early = step_indices < first_late
    per_early = first_late / early.sum().clamp_min(1).to(torch.float64)  # no host sync
    return torch.where(early, per_early, torch.ones((), dtype=torch.float64, device=step_indices.device))
