"""Samplers for a velocity field: the flow ODE and the law-preserving SDE (DESIGN.md sections 2 and 6).

Time runs from t = 0 (noise, x0 ~ N(0, I)) to t = 1 (data). Both samplers run without gradients; the SDE can
return its whole trajectory, which is what Adjoint Matching trains on (`tfft.adjoint`). Both take optional
conditions ``cond`` (n,), condition indices: row i follows the flow of its own condition, and the velocity is
called as ``velocity(x, t, cond)`` (without conditions as ``velocity(x, t)``, `tfft.conditions.call_velocity`).
The SDE's Euler-Maruyama loop itself is `tfft.euler_maruyama`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from tfft.conditions import call_velocity
from tfft.euler_maruyama import check_sde_options, sde_noise, sde_steps
from tfft.model import VelocityField

__all__ = [
    "Trajectory",
    "check_sde_arguments",
    "kappa",
    "sample_ode",
    "sample_sde",
    "sde_drift",
    "sigma",
    "step_coefficients",
    "time_grid",
    "velocity_gain",
]

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
def sample_ode(velocity: VelocityField, x0: Tensor, grid: Tensor, cond: Tensor | None = None) -> Tensor:
    """Euler integration of dx/dt = v(x, t) along `grid`, from x0 at t = grid[0] to t = grid[-1].

    x_{k+1} = x_k + (t_{k+1} - t_k) v(x_k, t_k).

    Args:
        velocity: v(x (n, d), t (n,)) -> (n, d).
        x0: start points, (n, d); noise when grid[0] = 0.
        grid: increasing times, (K + 1,), e.g. from `time_grid`.
        cond: optional condition indices, (n,).

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
        x = x + (grid[k + 1] - grid[k]) * call_velocity(velocity, x, grid[k].expand(n), cond)
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
    """An SDE trajectory on a uniform grid (no gradients attached, except `attached`).

    Attributes:
        xs: states X_k, (K + 1, n, d); xs[0] is the noise, xs[-1] the sample X_K.
        ts: times t_k = k / K, (K + 1,).
        h: step size 1 / K.
        offset: the schedule's offset (`kappa`, `sigma`, `velocity_gain`), by default h.
        velocities: v(X_k, t_k) of the sampling model for k < K, (K, n, d): what the Girsanov KL and the
            adjoint-matching loss need, kept so that they cost no extra network call. None if not recorded.
        attached_steps: the steps k (m,) at which the sampler kept v(X_k, t_k) attached to the model's
            parameters (`sample_sde(grad_steps=...)`), or None.
        attached: those velocities, (m, n, d), attached to the autograd graph; the adjoint-matching loss uses
            them instead of calling the network again on the same points.
        cond: the samples' condition indices, (n,), or None without conditions.
    """

    xs: Tensor
    ts: Tensor
    h: float
    offset: float
    velocities: Tensor | None = None
    attached_steps: Tensor | None = None
    attached: Tensor | None = None
    cond: Tensor | None = None

    @property
    def steps(self) -> int:
        """K, the number of Euler-Maruyama steps."""
        return self.ts.numel() - 1

    @property
    def x1(self) -> Tensor:
        """The end point X_K, (n, d)."""
        return self.xs[-1]

    def subset(self, rows: Tensor) -> Trajectory:
        """The same trajectory restricted to samples `rows` (index tensor); `attached` rows stay attached, and
        the conditions follow their rows."""
        return Trajectory(
            xs=self.xs[:, rows],
            ts=self.ts,
            h=self.h,
            offset=self.offset,
            velocities=None if self.velocities is None else self.velocities[:, rows],
            attached_steps=self.attached_steps,
            attached=None if self.attached is None else self.attached[:, rows],
            cond=None if self.cond is None else self.cond[rows],
        )


def step_coefficients(steps: int, offset: float) -> tuple[list[float], list[float], list[float]]:
    """The Euler-Maruyama step X_{k+1} = c_x[k] X_k + c_v[k] v(X_k, t_k) + c_n[k] eps_k as Python floats.

    c_x = 1 - h / (t_k + offset), c_v = h lambda(t_k), c_n = sqrt(h) sigma(t_k), t_k = k h, h = 1 / K; the same
    numbers drive the sampler, its adjoint and their CUDA-graph captures (`tfft.graphs`), with no host sync.
    """
    h = 1.0 / steps
    times = [k * h for k in range(steps)]
    c_x = [1.0 - h * kappa(t, offset) for t in times]
    c_v = [h * velocity_gain(t, offset) for t in times]
    c_n = [h**0.5 * sigma(t, offset) for t in times]
    return c_x, c_v, c_n


def check_sde_arguments(x0: Tensor, steps: int, offset: float | None) -> float:
    """Validate (x0, K, offset) of the SDE sampler; returns the offset (default 1 / K)."""
    if x0.dim() != 2:
        raise ValueError(f"x0 must have shape (n, d), got {tuple(x0.shape)}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    offset = 1.0 / steps if offset is None else float(offset)
    if not offset > 0:
        raise ValueError(f"offset must be > 0, got {offset}")
    return offset


def _sde_trajectory(
    xs: Tensor,
    vs: Tensor,
    ts: Tensor,
    offset: float,
    attached: list[Tensor | None],
    grad_steps: Tensor | None,
    cond: Tensor | None,
) -> Trajectory:
    """`sample_sde`'s `Trajectory` from states xs (K + 1, n, d), velocities vs (K, n, d), times ts (K + 1,), the
    attached velocities (m of (n, d), stacked to (m, n, d) in the graph) at grad_steps (m,), and cond (n,)."""
    steps = ts.numel() - 1
    h = 1.0 / steps
    with torch.enable_grad():  # the stack of attached velocities must stay in the graph
        stacked = torch.stack(attached) if attached else None  # type: ignore[arg-type]
    return Trajectory(
        xs=xs, ts=ts, h=h, offset=offset, velocities=vs,
        attached_steps=None if grad_steps is None else grad_steps.to(device=xs.device, dtype=torch.long),
        attached=stacked, cond=cond,
    )


@torch.no_grad()
def sample_sde(
    velocity: VelocityField,
    x0: Tensor,
    steps: int,
    *,
    offset: float | None = None,
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
    return_trajectory: bool = False,
    grad_steps: Tensor | None = None,
    grad_velocity: VelocityField | None = None,
    cond: Tensor | None = None,
) -> Tensor | Trajectory:
    """Euler-Maruyama for the law-preserving SDE dX = [lambda(t) v(X, t) - X / (t + h)] dt + sigma(t) dB.

    Uniform grid t_k = k / K (step h_K = 1 / K), offset h (default h_K), DESIGN.md section 6:
        X_{k+1} = X_k + h_K b(X_k, t_k) + sqrt(h_K) sigma(t_k) eps_k,   eps_k ~ N(0, I),   k = 0, ..., K - 1,
    b = lambda v - x / (t + h), lambda = (2t + h)/(t + h), sigma^2 = 2 (1 - t)/(t + h). The drift is
    v + (sigma^2/2) score, so the scheme targets the base model's own law for any h; the drift is never
    evaluated at t = 1, and every step (the last one too, with sigma_{K-1}^2 = 2 h_K / (1 - h_K + h)) is a
    plain Euler-Maruyama step. The lean adjoint (`tfft.adjoint.lean_adjoint`) is this recursion's exact
    discrete adjoint. The coefficients are Python floats (`step_coefficients`) and the trajectory is written
    into preallocated tensors: the loop has no host synchronisation.

    Args:
        velocity: v(x (n, d), t (n,)) -> (n, d); the current (fine-tuned) model.
        x0: start noise, (n, d). The SDE forgets it (memoryless as h -> 0), but it fixes n, d, device, dtype.
        steps: K >= 1.
        offset: h > 0 in kappa, sigma and lambda; None: 1 / K.
        generator: optional torch.Generator for the Brownian increments, drawn in one call as (K, n, d).
        noise: the increments eps, (K, n, d), instead of drawing them.
        return_trajectory: return a `Trajectory` (states and velocities) instead of X_K.
        grad_steps: optional step indices (m,) at which the velocity is evaluated with gradients enabled and kept
            attached in `Trajectory.attached` (requires return_trajectory).
        grad_velocity: the callable used at `grad_steps` (default `velocity`): e.g. the DDP wrapper of the module
            that `velocity` calls without gradients, so that only the attached calls go through its hooks.
        cond: optional condition indices (n,): every velocity call gets them, and the trajectory keeps them.

    Returns:
        X_K, (n, d), or the `Trajectory` with xs (K + 1, n, d) and velocities (K, n, d).
    """
    offset = check_sde_arguments(x0, steps, offset)
    noise = sde_noise(x0, steps, generator, noise)
    n, d = x0.shape
    check_sde_options(n, cond, grad_steps, return_trajectory)
    ts = time_grid(steps, device=x0.device, dtype=x0.dtype)
    coefficients = step_coefficients(steps, offset)
    attach = {} if grad_steps is None else {int(k): j for j, k in enumerate(grad_steps.tolist())}
    if not return_trajectory:
        x, _ = sde_steps(velocity, grad_velocity, x0, noise, ts, coefficients, attach, cond)
        return x
    xs = torch.empty((steps + 1, n, d), device=x0.device, dtype=x0.dtype)
    vs = torch.empty((steps, n, d), device=x0.device, dtype=x0.dtype)
    xs[0] = x0
    _, attached = sde_steps(velocity, grad_velocity, x0, noise, ts, coefficients, attach, cond, xs, vs)
    return _sde_trajectory(xs, vs, ts, offset, attached, grad_steps, cond)
