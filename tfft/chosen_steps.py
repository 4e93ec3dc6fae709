"""v_theta, v_base and the adjoint at the loss's chosen time steps k (m,) of a batch of trajectories.

The adjoint-matching regression (`tfft.matching.matching_loss`) needs, at each chosen step, the model's velocity
with gradients, the base velocity and the next adjoint state a_{k+1}, each (m, n, d). On the fast path
(`AdjointMatchingConfig.fast`) they cost as little as the recursion allows: the adjoint runs only on rows whose
terminal adjoint is non-zero (a linear recursion keeps a zero adjoint at zero), the other rows' base velocity is
one batched call at the chosen steps, and the model's velocity is the sampler's own evaluation when it kept it
attached (`tfft.sampling.sample_sde(grad_steps=...)`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from tfft.adjoint import lean_adjoint
from tfft.conditions import call_velocity
from tfft.model import VelocityField
from tfft.sampling import Trajectory
from tfft.solver_loops import SolverLoops

__all__ = ["adjoint_at_steps", "model_at_steps"]


def adjoint_at_steps(
    loops: SolverLoops, sub: Trajectory, terminal: Tensor, indices: Tensor, *, capacity: int, fast: bool
) -> tuple[Tensor, Tensor]:
    """a_{k+1} and v_base(X_k, t_k) at the chosen steps, (m, n, d) each.

    Args:
        loops: the solver's loops; the adjoint runs through ``loops.adjoint`` (CUDA graph or eager), its base
            is v_base.
        sub: the trajectories, xs (K + 1, n, d); terminal: a_K, (n, d); indices: the steps k, (m,).
        capacity: the pool size (`SolverLoops.adjoint`'s row buckets).
        fast: the fast path; False: the reference, `tfft.adjoint.lean_adjoint` on every row.

    Fast path: the adjoint runs only on rows with a non-zero terminal (a linear recursion keeps a zero adjoint
    at zero), and the other rows' base velocity is one batched call at the chosen steps.
    """
    m, (n, d) = indices.numel(), terminal.shape
    if not fast:
        adjoint = lean_adjoint(loops.base, sub, terminal, chunk=loops.adjoint_chunk)
        return adjoint.states[indices + 1], adjoint.base_velocities[indices]
    moving = (terminal != 0).any(dim=1)
    rows = torch.nonzero(moving).flatten()
    still = torch.nonzero(~moving).flatten()
    next_adjoint = torch.zeros((m, n, d), device=terminal.device, dtype=terminal.dtype)
    v_base = torch.empty((m, n, d), device=terminal.device, dtype=terminal.dtype)
    if rows.numel():
        adjoint = loops.adjoint(sub.subset(rows), terminal[rows], capacity)
        next_adjoint[:, rows] = adjoint.states[indices + 1]
        v_base[:, rows] = adjoint.base_velocities[indices]
    if still.numel():
        with torch.no_grad():
            x = sub.xs[indices][:, still]
            t = (indices.to(x.dtype) * sub.h).repeat_interleave(still.numel())
            c = None if sub.cond is None else sub.cond[still].repeat(m)
            v = call_velocity(loops.base, x.reshape(-1, d), t, c)  # autocast: in the autocast dtype
            v_base[:, still] = v.to(v_base.dtype).reshape(m, still.numel(), d)
    return next_adjoint, v_base


def model_at_steps(model: VelocityField, sub: Trajectory, indices: Tensor) -> Tensor:
    """v_theta(X_k, t_k) at the chosen steps k (m,) with gradients, (m, n, d): the sampler's own evaluations when
    it kept them attached and every state is finite (a NaN row would poison the gradient), else one call of
    `model` on the (m n, d) states."""
    if sub.attached is not None and bool(torch.isfinite(sub.xs[indices]).all()):
        return sub.attached
    m, (n, d) = indices.numel(), sub.x1.shape
    x = sub.xs[indices]
    t = (indices.to(x.dtype) * sub.h).repeat_interleave(n)
    cond = None if sub.cond is None else sub.cond.repeat(m)
    return call_velocity(model, x.reshape(m * n, d), t, cond).reshape(m, n, d)
