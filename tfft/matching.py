"""The adjoint-matching regression (DESIGN.md section 6): its loss, whole or in chunks of time steps.

The loss regresses the control u_k = (lambda_k / sigma_k)(v_theta - v_base)(X_k, t_k) of step k onto
-sigma_k a_{k+1}, the lean adjoint (`tfft.adjoint`) at the state X_{k+1} that this step's control moves, with the
targets conditioned by `tfft.conditioning`. Its optimum is p_theta ∝ q exp(g / gamma).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from tfft.adjoint import Adjoint
from tfft.conditioning import Conditioning
from tfft.conditions import call_velocity
from tfft.model import VelocityField
from tfft.sampling import Trajectory, sigma, velocity_gain

__all__ = [
    "LossTerms",
    "RegressionTargets",
    "adjoint_matching_loss",
    "chunked_matching_backward",
    "matching_loss",
    "regression_targets",
    "zero_loss",
]


@dataclass(frozen=True)
class LossTerms:
    """The adjoint-matching loss and its diagnostics (all detached except `loss`).

    Attributes:
        loss: scalar, attached to v_theta's parameters.
        per_sample: each sample's weighted share of the loss w_i L_i, (n,); sums to `loss`.
        loss_at_base: the same loss with v_theta = v_base (the irreducible part plus the signal), scalar.
        delta_v: mean over samples (weighted) and chosen steps of ||v_theta - v_base||^2, scalar.
        clipped_fraction: fraction of (counted sample, chosen step) targets that were clipped, scalar.
    """

    loss: Tensor
    per_sample: Tensor
    loss_at_base: Tensor
    delta_v: Tensor
    clipped_fraction: Tensor


def adjoint_matching_loss(
    velocity: VelocityField,
    traj: Trajectory,
    adjoint: Adjoint,
    step_indices: Tensor,
    *,
    sample_weights: Tensor | None = None,
    conditioning: Conditioning | None = None,
) -> LossTerms:
    """Adjoint Matching loss (DESIGN.md section 6), X and a held constant:

        L = sum_i w_i (1/m) sum_{k in steps} || u_k^i + y_k^i ||^2 / (d s_k),
        u_k = (lambda_k / sigma_k)(v_theta - v_base)(X_k^i, t_k),   y_k = sigma_k a_{k+1}^i,

    the sign a plus because a_K = -grad g / gamma. Without `conditioning`, d s_k = 1: the plain squared residual
    summed over dimensions and averaged over steps (the unconditioned regression); with it, y is clipped and s_k
    is the running scale of `Conditioning`. w_i are `sample_weights` (default uniform 1/n); samples with weight 0
    are dropped before the network call (a NaN there cannot reach the gradient). v_theta is called once on the
    chosen steps flattened to (m n', d); v_base comes from the adjoint pass. `matching_loss` is the same loss on
    velocities already evaluated.

    Args:
        velocity: v_theta, trained.
        traj: trajectory with xs (K + 1, n, d).
        adjoint: `lean_adjoint` of this trajectory.
        step_indices: m distinct indices in [0, K), e.g. from `select_time_steps`.
        sample_weights: optional (n,) non-negative weights (they are used as given, not renormalised).
        conditioning: optional running statistics, updated in place.

    Returns:
        `LossTerms`; a zero loss still attached to v_theta when no sample counts.
    """
    xs = traj.xs
    if adjoint.states.shape != xs.shape:
        raise ValueError(f"adjoint must have shape {tuple(xs.shape)}, got {tuple(adjoint.states.shape)}")
    n = xs.shape[1]
    step_indices = _check_steps(step_indices, traj.steps, xs.device)
    weights = _check_weights(sample_weights, n, xs)
    keep = weights > 0
    if not bool(keep.any()):
        return _empty_terms(velocity, n, xs)
    m, d = step_indices.numel(), xs.shape[2]
    x = xs[step_indices][:, keep]  # (m, n', d)
    n_kept = x.shape[1]
    t_flat = (step_indices.to(xs.dtype) * traj.h).repeat_interleave(n_kept)
    cond = None if traj.cond is None else traj.cond[keep].repeat(m)  # step-major, like x below
    v_theta = call_velocity(velocity, x.reshape(m * n_kept, d), t_flat, cond).reshape(m, n_kept, d)
    terms = matching_loss(
        v_theta, adjoint.base_velocities[step_indices][:, keep], adjoint.states[step_indices + 1][:, keep],
        step_indices, h=traj.h, offset=traj.offset, weights=weights[keep], conditioning=conditioning,
    )
    per_sample = torch.zeros(n, dtype=xs.dtype, device=xs.device)
    per_sample[keep] = terms.per_sample
    return LossTerms(terms.loss, per_sample, terms.loss_at_base, terms.delta_v, terms.clipped_fraction)


@dataclass(frozen=True)
class RegressionTargets:
    """The detached half of the regression at the m chosen steps (`regression_targets`).

    Attributes:
        target: sigma_k a_{k+1} after conditioning, (m, n, d).
        gain: lambda_k / sigma_k, (m, 1, 1): the residual is gain * (v_theta - v_base) + target.
        norm: each step's divisor d * divisor_k, (m, 1).
        weights: sample weights w, (n,).
        clipped_fraction: fraction of clipped targets, scalar.
    """

    target: Tensor
    gain: Tensor
    norm: Tensor
    weights: Tensor
    clipped_fraction: Tensor

    def per_step(self, v_theta: Tensor, v_base: Tensor, rows: slice) -> Tensor:
        """||gain (v_theta - v_base) + target||^2 / norm at the chosen steps ``rows``, (len(rows), n)."""
        u = self.gain[rows] * (v_theta - v_base)
        return (u + self.target[rows]).pow(2).sum(dim=2) / self.norm[rows]

    @torch.no_grad()
    def at_base(self) -> Tensor:
        """The loss at v_theta = v_base, scalar."""
        return ((self.target.pow(2).sum(dim=2) / self.norm).mean(dim=0) * self.weights).sum()


def regression_targets(
    next_adjoint: Tensor, step_indices: Tensor, *, h: float, offset: float, weights: Tensor,
    conditioning: Conditioning | None = None,
) -> RegressionTargets:
    """Targets sigma_k a_{k+1}, gains lambda_k / sigma_k and step norms at the chosen steps (conditioning's running
    statistics are updated here, once per loss). next_adjoint (m, n, d), step_indices (m,), weights (n,)."""
    m, n, d = next_adjoint.shape
    dtype, device = next_adjoint.dtype, next_adjoint.device
    w = weights.detach().to(device=device, dtype=dtype)
    t = step_indices.to(device=device, dtype=dtype) * h
    target = sigma(t, offset).reshape(m, 1, 1) * next_adjoint
    divisor = torch.full((m,), 1.0 / d, dtype=dtype, device=device)  # plain sum over dimensions
    clipped = torch.zeros((), dtype=dtype, device=device)
    if conditioning is not None:
        target, divisor, clipped_mask = conditioning.apply(target, step_indices, w)
        clipped = clipped_mask.to(dtype).mean()
    gain = (velocity_gain(t, offset) / sigma(t, offset)).reshape(m, 1, 1)
    return RegressionTargets(target, gain, (d * divisor).reshape(m, 1), w, clipped.detach())


def matching_loss(
    v_theta: Tensor,
    v_base: Tensor,
    next_adjoint: Tensor,
    step_indices: Tensor,
    *,
    h: float,
    offset: float,
    weights: Tensor,
    conditioning: Conditioning | None = None,
) -> LossTerms:
    """The loss of `adjoint_matching_loss` from velocities already evaluated at the chosen steps.

    Args:
        v_theta: (m, n, d) at (X_k, t_k) for the m chosen steps, attached to the trained parameters.
        v_base: (m, n, d) at the same points, detached.
        next_adjoint: a_{k+1}, (m, n, d).
        step_indices: the chosen k, (m,).
        h, offset: the SDE's step 1 / K and offset.
        weights: (n,) positive sample weights, used as given.
        conditioning: optional running statistics, updated in place.
    """
    reg = regression_targets(next_adjoint.to(v_theta.dtype), step_indices, h=h, offset=offset, weights=weights,
                             conditioning=conditioning)
    per_sample = reg.per_step(v_theta, v_base, slice(None)).mean(dim=0) * reg.weights  # (n,)
    loss = per_sample.sum()
    with torch.no_grad():
        delta_v = ((v_theta - v_base).pow(2).sum(dim=2).mean(dim=0) * reg.weights).sum() / reg.weights.sum()
    return LossTerms(loss, per_sample.detach(), reg.at_base().detach(), delta_v.detach(), reg.clipped_fraction)


def chunked_matching_backward(
    model_at: Callable[[slice], Tensor],
    v_base: Tensor,
    next_adjoint: Tensor,
    step_indices: Tensor,
    *,
    h: float,
    offset: float,
    weights: Tensor,
    chunk: int,
    conditioning: Conditioning | None = None,
    no_sync: Callable[[], AbstractContextManager[Any]] | None = None,
) -> LossTerms:
    """`matching_loss` with its gradient accumulated into ``.grad`` ``chunk`` chosen steps at a time.

    L = sum_j L_j with L_j = (1/m) sum_i w_i ||gain_j (v_theta - v_base) + target_j||^2 / norm_j is linear in the
    per-step terms, so backpropagating each chunk's sum gives the gradient of L exactly while only ``chunk * n``
    rows of the network's activations are alive at once (the memory of a large model's loss). The targets and the
    conditioning's statistics are computed once for all m steps, as `matching_loss` does.

    Args:
        model_at: rows (a slice of the m chosen steps) -> v_theta there, (len(rows), n, d), attached.
        v_base, next_adjoint, step_indices, h, offset, weights, conditioning: as for `matching_loss`.
        chunk: chosen steps per backward pass (>= 1).
        no_sync: a context for every chunk but the last (DDP's ``no_sync``: one all-reduce per step).

    Returns:
        `LossTerms` with ``loss`` detached (its gradient is already in ``.grad``).
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    m = step_indices.numel()
    reg = regression_targets(next_adjoint.to(v_base.dtype), step_indices, h=h, offset=offset, weights=weights,
                             conditioning=conditioning)
    per_sample = torch.zeros_like(reg.weights)
    delta_v = torch.zeros_like(reg.weights)
    starts = list(range(0, m, chunk))
    for start in starts:
        rows = slice(start, min(start + chunk, m))
        context = no_sync() if (no_sync is not None and start != starts[-1]) else nullcontext()
        with context:
            v_theta = model_at(rows)
            part = reg.per_step(v_theta, v_base[rows], rows).sum(dim=0) * reg.weights / m  # (n,)
            part.sum().backward()
        per_sample += part.detach()
        delta_v += (v_theta.detach() - v_base[rows]).pow(2).sum(dim=2).sum(dim=0) / m
    delta = (delta_v * reg.weights).sum() / reg.weights.sum()
    return LossTerms(per_sample.sum(), per_sample, reg.at_base().detach(), delta, reg.clipped_fraction)


def _check_steps(step_indices: Tensor, steps: int, device: torch.device) -> Tensor:
    step_indices = torch.as_tensor(step_indices, dtype=torch.long, device=device)
    if step_indices.dim() != 1 or step_indices.numel() == 0:
        raise ValueError("step_indices must be a non-empty 1-D tensor")
    if int(step_indices.min()) < 0 or int(step_indices.max()) >= steps:
        raise ValueError(f"step_indices must lie in [0, {steps})")
    return step_indices


def _check_weights(sample_weights: Tensor | None, n: int, like: Tensor) -> Tensor:
    if sample_weights is None:
        return torch.full((n,), 1.0 / max(n, 1), dtype=like.dtype, device=like.device)
    if sample_weights.shape != (n,):
        raise ValueError(f"sample_weights must have shape ({n},), got {tuple(sample_weights.shape)}")
    return sample_weights.detach().to(device=like.device, dtype=like.dtype)


def zero_loss(velocity: VelocityField, like: Tensor) -> Tensor:
    """A scalar 0 still attached to the model's parameters (so that DDP's backward sees every parameter)."""
    zero = torch.zeros((), dtype=like.dtype, device=like.device)
    return sum((p.sum() * 0.0 for p in _parameters(velocity)), zero)


def _empty_terms(velocity: VelocityField, n: int, like: Tensor) -> LossTerms:
    zero = torch.zeros((), dtype=like.dtype, device=like.device)
    return LossTerms(zero_loss(velocity, like), torch.zeros(n, dtype=like.dtype, device=like.device), zero, zero, zero)


def _parameters(velocity: VelocityField) -> list[Tensor]:
    return list(velocity.parameters()) if isinstance(velocity, torch.nn.Module) else []
