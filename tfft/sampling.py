"""Samplers for a velocity field: the flow ODE and the law-preserving SDE (DESIGN.md sections 2 and 6).

Time runs from t = 0 (noise, x0 ~ N(0, I)) to t = 1 (data). Both samplers run without gradients; the SDE can
return its whole trajectory, which is what Adjoint Matching trains on (`tfft.adjoint`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from tfft.model import VelocityField

__all__ = ["Trajectory", "kappa", "sample_ode", "sample_sde", "sde_drift", "sigma", "time_grid", "velocity_gain"]

_GRID_KINDS = ("uniform", "quadratic")


def time_grid(
    steps: int,
    *,
    kind: str = "uniform",
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Increasing time grid 0 = t_0 < ... < t_K = 1 with K = `steps`, shape (K + 1,).

    - "uniform": t_k = k / K.
    - "quadratic": t_k = (k / K)^2, finer near t = 0 where a fine-tuned velocity is least accurate (DESIGN.md
      section 6: give the ODE sampler a finer grid near t = 0). Its first step is 1/K^2, its last (2K - 1)/K^2.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if kind not in _GRID_KINDS:
        raise ValueError(f"kind must be one of {_GRID_KINDS}, got {kind!r}")
    grid = torch.linspace(0.0, 1.0, steps + 1, device=device, dtype=dtype)
    if kind == "quadratic":
        grid = grid * grid
    return grid


@torch.no_grad()
def sample_ode(velocity: VelocityField, x0: Tensor, grid: Tensor) -> Tensor:
    """Euler integration of dx/dt = v(x, t) along `grid`, from x0 at t = grid[0] to t = grid[-1].

    x_{k+1} = x_k + (t_{k+1} - t_k) v(x_k, t_k).

    Args:
        velocity: v(x (n, d), t (n,)) -> (n, d).
        x0: start points, (n, d); noise when grid[0] = 0.
        grid: increasing times, (K + 1,), e.g. from `time_grid`.

    Returns:
        End points x_K, (n, d).
    """
    if x0.dim() != 2:
        raise ValueError(f"x0 must have shape (n, d), got {tuple(x0.shape)}")
    grid = grid.to(device=x0.device, dtype=x0.dtype)
    if grid.dim() != 1 or grid.numel() < 2:
        raise ValueError(f"grid must have shape (K + 1,) with K >= 1, got {tuple(grid.shape)}")
    if not bool((grid[1:] > grid[:-1]).all()):
        raise ValueError("grid must be strictly increasing")
    x = x0.clone()
    n = x0.shape[0]
    for k in range(grid.numel() - 1):
        x = x + (grid[k + 1] - grid[k]) * velocity(x, grid[k].expand(n))
    return x


def kappa(t: Tensor | float, h: float) -> Tensor | float:
    """kappa_t = 1 / (t + h): the drift's pull towards 0, the linear interpolant's 1/t with offset h (DESIGN §6)."""
    return 1.0 / (t + h)


def sigma(t: Tensor | float, h: float) -> Tensor | float:
    """Law-preserving noise sigma(t) = sqrt(2 (1 - t) / (t + h)) with offset h (DESIGN.md section 6).

    The offset enters only the denominator, so sigma(1) = 0 and the SDE keeps the base model's marginals for
    every h; as h -> 0 it is the memoryless schedule sqrt(2 (1 - t) / t).
    """
    return (2.0 * (1.0 - t) / (t + h)) ** 0.5


def velocity_gain(t: Tensor | float, h: float) -> Tensor | float:
    """lambda(t) = (2t + h) / (t + h), the velocity's factor in the SDE drift (DESIGN.md section 6).

    b(x, t) = lambda(t) v(x, t) - kappa_t x = v + (sigma^2 / 2) score for the linear interpolant, whose score
    is (t v - x) / (1 - t).
    """
    return (2.0 * t + h) / (t + h)


def sde_drift(velocity: Tensor, x: Tensor, t: float, h: float) -> Tensor:
    """b = lambda(t) v - x / (t + h) from a velocity already evaluated at (x, t); shapes (n, ...)."""
    return velocity_gain(t, h) * velocity - kappa(t, h) * x


@dataclass(frozen=True)
class Trajectory:
    """An SDE trajectory on a uniform grid (no gradients attached).

    Attributes:
        xs: states X_k, (K + 1, n, d); xs[0] is the noise, xs[-1] the sample X_K.
        ts: times t_k = k / K, (K + 1,).
        h: step size 1 / K.
        offset: the schedule's offset (`kappa`, `sigma`, `velocity_gain`), by default h.
        velocities: v(X_k, t_k) of the sampling model for k < K, (K, n, d): what the Girsanov KL and the
            adjoint-matching loss need, kept so that they cost no extra network call. None if not recorded.
    """

    xs: Tensor
    ts: Tensor
    h: float
    offset: float
    velocities: Tensor | None = None

    @property
    def steps(self) -> int:
        """K, the number of Euler-Maruyama steps."""
        return self.ts.numel() - 1

    @property
    def x1(self) -> Tensor:
        """The end point X_K, (n, d)."""
        return self.xs[-1]


@torch.no_grad()
def sample_sde(
    velocity: VelocityField,
    x0: Tensor,
    steps: int,
    *,
    offset: float | None = None,
    generator: torch.Generator | None = None,
    return_trajectory: bool = False,
) -> Tensor | Trajectory:
    """Euler-Maruyama for the law-preserving SDE dX = [lambda(t) v(X, t) - X / (t + h)] dt + sigma(t) dB.

    Uniform grid t_k = k / K (step h_K = 1 / K), offset h (default h_K), DESIGN.md section 6:
        X_{k+1} = X_k + h_K b(X_k, t_k) + sqrt(h_K) sigma(t_k) eps_k,   eps_k ~ N(0, I),   k = 0, ..., K - 1,
    b = lambda v - x / (t + h), lambda = (2t + h)/(t + h), sigma^2 = 2 (1 - t)/(t + h). The drift is
    v + (sigma^2/2) score, so the scheme targets the base model's own law for any h; the drift is never
    evaluated at t = 1, and every step (the last one too, with sigma_{K-1}^2 = 2 h_K / (1 - h_K + h)) is a
    plain Euler-Maruyama step. The lean adjoint (`tfft.adjoint.lean_adjoint`) is this recursion's exact
    discrete adjoint.

    Args:
        velocity: v(x (n, d), t (n,)) -> (n, d); the current (fine-tuned) model.
        x0: start noise, (n, d). The SDE forgets it (memoryless as h -> 0), but it fixes n, d, device, dtype.
        steps: K >= 1.
        offset: h > 0 in kappa, sigma and lambda; None: 1 / K.
        generator: optional torch.Generator for the Brownian increments.
        return_trajectory: return a `Trajectory` (states and velocities) instead of X_K.

    Returns:
        X_K, (n, d), or the `Trajectory` with xs (K + 1, n, d) and velocities (K, n, d).
    """
    if x0.dim() != 2:
        raise ValueError(f"x0 must have shape (n, d), got {tuple(x0.shape)}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    h = 1.0 / steps
    offset = h if offset is None else float(offset)
    if not offset > 0:
        raise ValueError(f"offset must be > 0, got {offset}")
    ts = time_grid(steps, device=x0.device, dtype=x0.dtype)
    times = [k * h for k in range(steps + 1)]  # Python floats: no host sync per step
    n = x0.shape[0]
    x = x0.clone()
    states = [x] if return_trajectory else []
    velocities = []
    for k in range(steps):
        t = times[k]
        v = velocity(x, ts[k].expand(n))
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x = x + h * sde_drift(v, x, t, offset) + (h**0.5) * sigma(t, offset) * noise
        if return_trajectory:
            states.append(x)
            velocities.append(v)
    if return_trajectory:
        return Trajectory(xs=torch.stack(states), ts=ts, h=h, offset=offset, velocities=torch.stack(velocities))
    return x
