"""Adjoint Matching (Domingo-Enrich et al., ICLR 2025) for the law-preserving SDE of `tfft.sampling`.

DESIGN.md section 6. Trajectories come from the SDE of the current model without gradients; the lean adjoint
is the exact discrete adjoint of that Euler-Maruyama recursion with the BASE drift; the loss regresses the control
u_k = (lambda_k / sigma_k)(v_theta - v_base)(X_k, t_k) of step k onto -sigma_k a_{k+1}, the adjoint at the
state X_{k+1} that this step's control moves. Its optimum is p_theta ∝ q exp(g / gamma).

The regression is conditioned (`Conditioning`): ||sigma_k a_{k+1}|| is clipped per sample at a running high
quantile of the non-zero targets, and optionally each step's squared residual is divided by a running
stop-gradient scale of ||sigma_k a_{k+1}||^2 / d. Both leave each step's minimiser unchanged or nearly so; without
them trajectories near a boundary between modes (huge adjoints) and early steps (large sigma^2) carry the loss.
The normalisation is off by default: dividing by sigma_k^2 moves the gradient's weight onto the last steps, and
on the 2-D task it fine-tuned markedly slower than the clipped, unnormalised loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from tfft.conditions import call_velocity
from tfft.model import VelocityField
from tfft.sampling import Trajectory, sigma, step_coefficients, velocity_gain

__all__ = [
    "Adjoint",
    "Conditioning",
    "LossTerms",
    "RegressionTargets",
    "adjoint_matching_loss",
    "chunked_matching_backward",
    "control",
    "girsanov_kl",
    "girsanov_kl_estimate",
    "lean_adjoint",
    "matching_loss",
    "regression_targets",
    "select_time_steps",
    "step_weights",
    "zero_loss",
]


@dataclass(frozen=True)
class Adjoint:
    """The lean adjoint along a trajectory.

    Attributes:
        states: a_k, (K + 1, n, d), aligned with `Trajectory.xs`; a_K = the terminal value.
        base_velocities: v_base(X_k, t_k) for k < K, (K, n, d): computed on the way, reused by the loss and KL.
    """

    states: Tensor
    base_velocities: Tensor


def lean_adjoint(base_velocity: VelocityField, traj: Trajectory, terminal: Tensor) -> Adjoint:
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
    for k in range(steps - 1, -1, -1):
        # b = lambda v - kappa x, so a_k = (1 - h kappa) a_{k+1} + h lambda J_v^T a_{k+1} = c_x a + c_v J_v^T a
        a = states[k + 1]
        with torch.enable_grad():
            x = xs[k].detach().requires_grad_(True)
            v_base = call_velocity(base_velocity, x, traj.ts[k].expand(n), traj.cond)
            (vjp,) = torch.autograd.grad(v_base, x, grad_outputs=a)
        torch.mul(a, c_x[k], out=states[k]).add_(vjp, alpha=c_v[k])
        base_velocities[k] = v_base.detach()
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


@dataclass
class Conditioning:
    """Running, stop-gradient statistics that condition the regression (DESIGN.md section 6).

    For each step k, on the regression targets y = sigma_k a_{k+1} (n, d):
    - clip: ||y_i|| is capped at `clip_factor` c_k, c_k a running mean (decay `decay`) of the batch's
      `clip_quantile`-quantile of the non-zero ||y|| (0 disables; inactive samples of a tail objective have y = 0
      and do not count): only outliers are clipped, so the regression's targets keep their size;
    - normalise: the step's squared residual is divided by d s_k, s_k a running mean of the batch mean of
      ||y_clipped||^2 (off when `normalize` is False).
    The statistics start from the first batch that has a non-zero target at that step.

    Attributes:
        steps: K.
        normalize, clip_quantile, decay: the switches above.
        scale, clip: running s_k and c_k, (K,), NaN until seen.
    """

    steps: int
    normalize: bool = False
    clip_quantile: float = 0.9
    clip_factor: float = 2.0
    decay: float = 0.9
    scale: Tensor = field(default=None)  # type: ignore[assignment]
    clip: Tensor = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if not 0.0 <= self.clip_quantile <= 1.0:
            raise ValueError(f"clip_quantile must be in [0, 1] (0: no clipping), got {self.clip_quantile}")
        if not self.clip_factor >= 1.0:
            raise ValueError(f"clip_factor must be >= 1, got {self.clip_factor}")
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {self.decay}")
        if self.scale is None:
            self.scale = torch.full((self.steps,), math.nan, dtype=torch.float64)
        if self.clip is None:
            self.clip = torch.full((self.steps,), math.nan, dtype=torch.float64)

    def _blend(self, name: str, rows: Tensor, batch: Tensor) -> Tensor:
        """Running mean `name` at `rows` updated with positive batch values; NaN entries start at the batch value."""
        running = getattr(self, name)
        if running.device != batch.device:  # the statistics live where the batch is: no host round trip
            running = running.to(batch.device)
            setattr(self, name, running)
        old = running[rows]
        new = torch.where(torch.isnan(old), batch, self.decay * old + (1.0 - self.decay) * batch)
        new = torch.where(batch > 0, new, old)
        running[rows] = new
        return new

    def apply(self, target: Tensor, step_indices: Tensor, weights: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Update the statistics with a batch and return (clipped target, per-step divisor (m,), clipped mask).

        Runs on the batch's device without a host synchronisation.

        Args:
            target: y = sigma_k a_{k+1}, (m, n, d) at the chosen steps.
            step_indices: the chosen k, (m,).
            weights: per-sample weights (n,), zero for samples that do not count.
        """
        m, n, d = target.shape
        device = target.device
        rows = step_indices.to(device)
        norms = target.detach().norm(dim=2).to(torch.float64)  # (m, n)
        counted = (weights > 0).to(device)
        clipped = torch.zeros(m, n, dtype=torch.bool, device=device)
        if self.clip_quantile > 0:
            # The quantile is over the non-zero targets only: in a tail objective most samples are inactive
            # (y = 0), and a quantile over all of them would clip the whole signal away. A step without any
            # gives NaN, then 0, which leaves its running value unchanged.
            signal = torch.where(counted[None, :] & (norms > 0), norms, torch.full_like(norms, math.nan))
            batch_q = torch.nan_to_num(torch.nanquantile(signal, self.clip_quantile, dim=1), nan=0.0)
            cap = self.clip_factor * self._blend("clip", rows, batch_q)  # (m,)
            cap = torch.where(torch.isnan(cap), torch.full_like(cap, math.inf), cap)
            over = norms > cap[:, None]
            clipped = over & counted[None, :]
            factor = torch.where(over, cap[:, None] / norms.clamp_min(1e-300), torch.ones_like(norms))
            target = target * factor.to(target.dtype)[:, :, None]
        divisor = torch.ones(m, dtype=torch.float64, device=device)
        if self.normalize:
            w = weights.detach().to(device=device, dtype=torch.float64)
            total = w.sum()
            energy = (target.detach().pow(2).sum(dim=2).to(torch.float64) * w).sum(dim=1) / total.clamp_min(1e-300) / d
            energy = torch.where(total > 0, energy, torch.zeros_like(energy))
            s = self._blend("scale", rows, energy)
            divisor = torch.where(torch.isnan(s) | (s <= 0), torch.ones_like(s), s)
        return target, divisor.to(dtype=target.dtype), clipped

    def state_dict(self) -> dict[str, Tensor]:
        """The running statistics (for checkpoints)."""
        return {"scale": self.scale.detach().cpu().clone(), "clip": self.clip.detach().cpu().clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore `state_dict()`; shapes must match K."""
        for name in ("scale", "clip"):
            value = torch.as_tensor(state[name], dtype=torch.float64)
            if value.shape != (self.steps,):
                raise ValueError(f"conditioning {name} has shape {tuple(value.shape)}, expected ({self.steps},)")
            setattr(self, name, value.clone())


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


def _parameters(velocity: VelocityField) -> list[Tensor]:
    return list(velocity.parameters()) if isinstance(velocity, torch.nn.Module) else []
