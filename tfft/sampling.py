"""Samplers for a velocity field: the flow ODE and the memoryless SDE (DESIGN.md sections 2 and 6).

Time runs from t = 0 (noise, x0 ~ N(0, I)) to t = 1 (data). Both samplers run without gradients; the SDE can
return its whole trajectory, which is what Adjoint Matching trains on (`tfft.adjoint`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from tfft.model import VelocityField

__all__ = ["Trajectory", "kappa", "sample_ode", "sample_sde", "sigma", "time_grid"]

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
    """kappa_t = 1 / (t + h), the linear interpolant's kappa_t = 1/t with offset h (DESIGN.md section 6)."""
    return 1.0 / (t + h)


def sigma(t: Tensor | float, h: float) -> Tensor | float:
    """Memoryless noise sigma(t) = sqrt(2 (1 - t + h) / (t + h)), offset by h (DESIGN.md section 6)."""
    return (2.0 * (1.0 - t + h) / (t + h)) ** 0.5


@dataclass(frozen=True)
class Trajectory:
    """A memoryless-SDE trajectory on a uniform grid (no gradients attached).

    Attributes:
        xs: states X_{t_k}, (K + 1, n, d); xs[0] is the noise, xs[-1] the sample.
        ts: times t_k = k h, (K + 1,).
        h: step size 1 / K, also the offset in `kappa` and `sigma`.
    """

    xs: Tensor
    ts: Tensor
    h: float

    @property
    def steps(self) -> int:
        """K, the number of Euler-Maruyama steps."""
        return self.ts.numel() - 1

    @property
    def x1(self) -> Tensor:
        """The end point X_1, (n, d)."""
        return self.xs[-1]


@torch.no_grad()
def sample_sde(
    velocity: VelocityField,
    x0: Tensor,
    steps: int,
    *,
    generator: torch.Generator | None = None,
    return_trajectory: bool = False,
) -> Tensor | Trajectory:
    """Euler-Maruyama for the memoryless SDE dX = [2 v(X, t) - kappa_t X] dt + sigma(t) dB (DESIGN.md section 6).

    Uniform grid t_k = k h, h = 1/K, with kappa and sigma offset by h:
        X_{k+1} = X_k + h [2 v(X_k, t_k) - kappa(t_k) X_k] + sqrt(h) sigma(t_k) eps_k,   eps_k ~ N(0, I).
    The last step (k = K - 1) adds no noise: the exact memoryless schedule has sigma(1) = 0 and the offset only
    keeps t = 0 finite, so X_1 is the noise-free Euler end point that the reward sees. The lean adjoint
    (`tfft.adjoint.lean_adjoint`) differentiates exactly this deterministic last step.

    Args:
        velocity: v(x (n, d), t (n,)) -> (n, d); the current (fine-tuned) model.
        x0: start noise, (n, d). The SDE forgets it (memoryless), but it fixes n, d, device and dtype.
        steps: K >= 1.
        generator: optional torch.Generator for the Brownian increments.
        return_trajectory: return a `Trajectory` instead of X_1.

    Returns:
        X_1, (n, d), or the `Trajectory` with xs (K + 1, n, d).
    """
    if x0.dim() != 2:
        raise ValueError(f"x0 must have shape (n, d), got {tuple(x0.shape)}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    h = 1.0 / steps
    ts = time_grid(steps, device=x0.device, dtype=x0.dtype)
    n = x0.shape[0]
    x = x0.clone()
    states = [x] if return_trajectory else []
    for k in range(steps):
        t = float(ts[k])
        drift = 2.0 * velocity(x, ts[k].expand(n)) - kappa(t, h) * x
        x = x + h * drift
        if k < steps - 1:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = x + (h**0.5) * sigma(t, h) * noise
        if return_trajectory:
            states.append(x)
    if return_trajectory:
        return Trajectory(xs=torch.stack(states), ts=ts, h=h)
    return x
