"""ODE and memoryless-SDE samplers against closed forms (DESIGN.md sections 2 and 6)."""

from __future__ import annotations

import math

import pytest
import torch

from tfft.model import GaussianVelocity, gaussian_velocity_coefficient
from tfft.sampling import Trajectory, kappa, sample_ode, sample_sde, sigma, time_grid




def _euler_maruyama_variance(steps: int) -> float:
    """Exact per-coordinate variance of X_1 from `sample_sde` with the N(0, I) velocity (a linear recursion).

    X_{k+1} = A_k X_k + sqrt(h) sigma_k eps_k with A_k = 1 + h (2 c(t_k) - kappa(t_k)); no noise on the last step.
    """
    h, variance = 1.0 / steps, 1.0
    for k in range(steps):
        t = k * h
        slope = 1.0 + h * (2.0 * (2 * t - 1) / (t * t + (1 - t) ** 2) - 1.0 / (t + h))
        variance = slope**2 * variance + (h * 2.0 * (1 - t + h) / (t + h) if k < steps - 1 else 0.0)
    return variance


def test_time_grids() -> None:
    uniform = time_grid(10)
    quadratic = time_grid(10, kind="quadratic")
    for grid in (uniform, quadratic):
        assert grid.shape == (11,)
        assert float(grid[0]) == 0.0 and float(grid[-1]) == 1.0
        assert bool((grid[1:] > grid[:-1]).all())
    torch.testing.assert_close(uniform, torch.arange(11) / 10.0)
    assert math.isclose(float(quadratic[1]), 0.01, rel_tol=1e-6)
    steps = quadratic.diff()
    # Finer than uniform below t = 1/4 and increasing step sizes.
    assert bool((steps[quadratic[1:] <= 0.25] < 0.1).all()) and bool((steps.diff() > 0).all())
    with pytest.raises(ValueError):
        time_grid(0)
    with pytest.raises(ValueError):
        time_grid(5, kind="cubic")


def test_memoryless_schedule_values() -> None:
    assert math.isclose(kappa(0.0, 0.1), 10.0)
    assert math.isclose(sigma(0.5, 0.0), math.sqrt(2.0))
    assert math.isclose(sigma(1.0, 0.0), 0.0)
    t = torch.tensor([0.0, 0.25, 1.0])
    torch.testing.assert_close(sigma(t, 0.05), torch.sqrt(2 * (1.05 - t) / (t + 0.05)))
    torch.testing.assert_close(kappa(t, 0.05), 1 / (t + 0.05))


def test_ode_follows_the_exact_flow_from_a_point() -> None:
    # For data N(m, I) the exact flow is x_t = t m + sqrt(t^2 + (1-t)^2) x0, so x_1 = m + x0 and x_{1/2} =
    # m/2 + x0/sqrt(2). Euler error is O(1/K).
    mean = torch.tensor([1.0, -2.0])
    velocity = GaussianVelocity(mean=mean)
    x0 = torch.tensor([[0.5, 0.3], [-1.0, 2.0]])
    end = sample_ode(velocity, x0, time_grid(2000))
    torch.testing.assert_close(end, mean + x0, atol=5e-3, rtol=0)
    half = sample_ode(velocity, x0, torch.linspace(0, 0.5, 1001))
    torch.testing.assert_close(half, mean / 2 + x0 / math.sqrt(2), atol=5e-3, rtol=0)
    torch.testing.assert_close(sample_ode(velocity, x0, time_grid(50)), sample_ode(velocity, x0, time_grid(50)))


@pytest.mark.parametrize("kind", ["uniform", "quadratic"])
def test_ode_samples_have_the_data_moments(kind: str) -> None:
    n = 20_000
    generator = torch.Generator().manual_seed(0)
    mean = torch.tensor([2.0, -1.0])
    x0 = torch.randn(n, 2, generator=generator)
    samples = sample_ode(GaussianVelocity(), x0, time_grid(400, kind=kind))
    # SE(mean) = 1/sqrt(n) = 0.007, SE(var) = sqrt(2/n) = 0.01; Euler bias at 400 steps is < 0.01.
    assert samples.mean(0).abs().max() < 0.03
    torch.testing.assert_close(torch.cov(samples.T), torch.eye(2), atol=0.05, rtol=0)
    shifted = sample_ode(GaussianVelocity(mean=mean), x0, time_grid(400, kind=kind))
    assert (shifted.mean(0) - mean).abs().max() < 0.03


def test_sde_samples_have_the_data_moments() -> None:
    n = 20_000
    generator = torch.Generator().manual_seed(1)
    x0 = torch.randn(n, 2, generator=generator)
    samples = sample_sde(GaussianVelocity(), x0, 200, generator=generator)
    assert isinstance(samples, torch.Tensor) and samples.shape == (n, 2)
    # Euler-Maruyama with the offset h inflates the variance by O(h): 1.015 at 200 steps (exact recursion);
    # SE(var) = 0.01, SE(mean) = 0.007.
    assert abs(_euler_maruyama_variance(200) - 1.0) < 0.02
    assert samples.mean(0).abs().max() < 0.03
    torch.testing.assert_close(torch.cov(samples.T), torch.eye(2), atol=0.05, rtol=0)
    mean = torch.tensor([2.0, -1.0])
    shifted = sample_sde(GaussianVelocity(mean=mean), x0, 200, generator=generator)
    assert (shifted.mean(0) - mean).abs().max() < 0.05


def test_sde_variance_matches_the_euler_maruyama_recursion() -> None:
    # At 40 steps the discretisation bias is visible (variance 1.072) and must match the recursion exactly.
    n = 40_000
    generator = torch.Generator().manual_seed(2)
    samples = sample_sde(GaussianVelocity(), torch.randn(n, 2, generator=generator), 40, generator=generator)
    expected = _euler_maruyama_variance(40)
    assert abs(expected - 1.0724) < 1e-3
    # SE(var) = 1.07 sqrt(2/n) = 0.0076 per coordinate.
    assert (samples.var(0) - expected).abs().max() < 0.03


def test_sde_trajectory_is_memoryless_and_ends_without_noise() -> None:
    n, steps = 20_000, 40
    generator = torch.Generator().manual_seed(3)
    x0 = torch.randn(n, 2, generator=generator)
    velocity = GaussianVelocity()
    traj = sample_sde(velocity, x0, steps, generator=torch.Generator().manual_seed(4), return_trajectory=True)
    assert isinstance(traj, Trajectory)
    assert traj.xs.shape == (steps + 1, n, 2) and traj.steps == steps and traj.h == 1 / steps
    torch.testing.assert_close(traj.ts, time_grid(steps))
    torch.testing.assert_close(traj.xs[0], x0)
    end = sample_sde(velocity, x0, steps, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(traj.x1, end)
    # The last step is the deterministic Euler step.
    t, h, x = traj.ts[-2], traj.h, traj.xs[-2]
    drift = 2 * velocity(x, t.expand(n)) - kappa(float(t), h) * x
    torch.testing.assert_close(traj.xs[-1], x + h * drift)
    # Memoryless: the end point is uncorrelated with the start (the ODE maps x0 to itself here).
    correlation = torch.corrcoef(torch.stack([x0[:, 0], traj.x1[:, 0]]))[0, 1]
    assert abs(float(correlation)) < 4 / math.sqrt(n)
    assert not traj.xs.requires_grad


def test_samplers_validate_inputs() -> None:
    velocity = GaussianVelocity()
    with pytest.raises(ValueError):
        sample_ode(velocity, torch.zeros(3, 2), torch.tensor([0.0, 0.5, 0.4]))
    with pytest.raises(ValueError):
        sample_ode(velocity, torch.zeros(3), time_grid(4))
    with pytest.raises(ValueError):
        sample_sde(velocity, torch.zeros(3, 2), 0)
    assert float(gaussian_velocity_coefficient(torch.tensor(0.0))) == -1.0
