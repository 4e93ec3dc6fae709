"""The Euler-Maruyama loop of `tfft.sampling.sample_sde`: its Brownian increments, its option checks, its K steps.

    X_{k+1} = c_x[k] X_k + c_v[k] v(X_k, t_k) + c_n[k] eps_k,   eps_k ~ N(0, I),   k = 0, ..., K - 1,

with the coefficients of `tfft.sampling.step_coefficients` as Python floats, so the loop has no host
synchronisation. `tfft.sampling.sample_sde` validates its arguments, calls :func:`sde_steps` and wraps the
result in a `tfft.sampling.Trajectory`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tfft.conditions import call_velocity
from tfft.model import VelocityField

__all__ = ["check_sde_options", "sde_noise", "sde_steps"]


def sde_noise(x0: Tensor, steps: int, generator: torch.Generator | None, noise: Tensor | None) -> Tensor:
    """The Brownian increments eps of `sample_sde`, (K, n, d) for x0 (n, d): `noise` when given (its shape
    checked), else drawn in one call from `generator` with x0's device and dtype."""
    n, d = x0.shape
    if noise is None:
        noise = torch.randn((steps, n, d), generator=generator, device=x0.device, dtype=x0.dtype)
    elif noise.shape != (steps, n, d):
        raise ValueError(f"noise must have shape {(steps, n, d)}, got {tuple(noise.shape)}")
    return noise


def check_sde_options(n: int, cond: Tensor | None, grad_steps: Tensor | None, return_trajectory: bool) -> None:
    """Validate `sample_sde`'s conditions cond (n,) and that grad_steps (m,) comes with return_trajectory."""
    if cond is not None and cond.shape != (n,):
        raise ValueError(f"cond must have shape ({n},), got {tuple(cond.shape)}")
    if grad_steps is not None and not return_trajectory:
        raise ValueError("grad_steps needs return_trajectory=True")


def sde_steps(
    velocity: VelocityField,
    grad_velocity: VelocityField | None,
    x0: Tensor,
    noise: Tensor,
    ts: Tensor,
    coefficients: tuple[list[float], list[float], list[float]],
    attach: dict[int, int],
    cond: Tensor | None,
    xs: Tensor | None = None,
    vs: Tensor | None = None,
) -> tuple[Tensor, list[Tensor | None]]:
    """The K Euler-Maruyama steps of `sample_sde`, X_{k+1} = c_x[k] X_k + c_v[k] v(X_k, t_k) + c_n[k] eps_k.

    Args:
        velocity, grad_velocity, cond: as in `sample_sde`.
        x0: X_0, (n, d).
        noise: eps, (K, n, d).
        ts: t_k, (K + 1,).
        coefficients: (c_x, c_v, c_n) of `step_coefficients`, K floats each.
        attach: step k -> slot j of the steps whose velocity is kept attached (grad_steps[j] = k).
        xs, vs: with a trajectory, the states (K + 1, n, d) (xs[0] = x0 already) and velocities (K, n, d),
            written in place; without (None), two (n, d) buffers alternate.

    Returns:
        X_K, (n, d), and the attached velocities, one (n, d) per slot of `attach`.
    """
    n = x0.shape[0]
    c_x, c_v, c_n = coefficients
    if xs is None:
        buffers = (torch.empty_like(x0), torch.empty_like(x0))
    attached: list[Tensor | None] = [None] * len(attach)
    x = x0
    for k in range(noise.shape[0]):
        t = ts[k].expand(n)
        if k in attach:
            with torch.enable_grad():
                # a copy: the model may save its input for backward, and xs is written in place below
                v_attached = call_velocity(grad_velocity or velocity, x.clone(), t, cond)
            attached[attach[k]] = v_attached
            v = v_attached.detach()
        else:
            v = call_velocity(velocity, x, t, cond)
        out = xs[k + 1] if xs is not None else buffers[k % 2]
        torch.mul(x, c_x[k], out=out)
        out.add_(v, alpha=c_v[k]).add_(noise[k], alpha=c_n[k])
        if vs is not None:
            vs[k] = v
        x = out
    return x, attached
