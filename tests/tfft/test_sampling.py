"""ODE and memoryless-SDE samplers against closed forms (DESIGN.md sections 2 and 6)."""

from __future__ import annotations

import math

import pytest
import torch

from tfft.model import GaussianVelocity, gaussian_velocity_coefficient
from tfft.sampling import Trajectory, kappa, sample_ode, sample_sde, sde_drift, sigma, time_grid, velocity_gain




def _euler_maruyama_moments(steps: int, mean: float = 0.0) -> tuple[float, float]:
    """Exact per-coordinate (mean, variance) of X_K from `sample_sde` for the N(m, I) velocity (linear recursion).

    b(x, t) = lambda (m + c (x - t m)) - x / (t + h) is affine in x: X_{k+1} = A_k X_k + h B_k + sqrt(h) sigma_k
    eps_k with A_k = 1 + h (lambda_k c_k - kappa_k), B_k = lambda_k m (1 - c_k t_k); every step adds noise.
    """
    h, mu, variance = 1.0 / steps, 0.0, 1.0
    for k in range(steps):
        t = k * h
        c = (2 * t - 1) / (t * t + (1 - t) ** 2)
        lam = (2 * t + h) / (t + h)
        slope = 1.0 + h * (lam * c - 1.0 / (t + h))
        mu = slope * mu + h * lam * mean * (1 - c * t)
        variance = slope**2 * variance + h * 2.0 * (1 - t) / (t + h)
    return mu, variance


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


def test_law_preserving_schedule_values() -> None:
    assert math.isclose(kappa(0.0, 0.1), 10.0)
    assert math.isclose(sigma(0.5, 0.0), math.sqrt(2.0))
    assert math.isclose(sigma(1.0, 0.05), 0.0)  # the offset does not reach the numerator
    assert math.isclose(velocity_gain(0.0, 0.1), 1.0) and math.isclose(velocity_gain(1.0, 0.0), 2.0)
    t = torch.tensor([0.0, 0.25, 0.9])
    torch.testing.assert_close(sigma(t, 0.05), torch.sqrt(2 * (1 - t) / (t + 0.05)))
    torch.testing.assert_close(kappa(t, 0.05), 1 / (t + 0.05))
    # drift = v + (sigma^2 / 2) score with the linear interpolant's score (t v - x) / (1 - t), for any offset.
    x, v = torch.tensor([[0.7, -1.2]]), torch.tensor([[0.3, 0.4]])
    for time in (0.0, 0.3, 0.9):
        score = (time * v - x) / (1 - time)
        expected = v + 0.5 * float(sigma(time, 0.05)) ** 2 * score
        torch.testing.assert_close(sde_drift(v, x, time, 0.05), expected)


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


def test_sde_keeps_the_base_law_at_few_steps() -> None:
    # The exact moments of the scheme: mean 0 and variance 1 within 0.5% at K = 20 (the first offset schedule gave
    # 1.072 at K = 40), and the mean of N(2, I) data within 0.5%.
    for steps in (20, 40):
        mu, variance = _euler_maruyama_moments(steps)
        assert mu == 0.0 and abs(variance - 1.0) < 5e-3
        shifted_mean, _ = _euler_maruyama_moments(steps, mean=2.0)
        assert abs(shifted_mean - 2.0) < 1e-2
    assert abs(_euler_maruyama_moments(20)[1] - 0.99768) < 1e-4


def test_sde_samples_match_the_exact_recursion() -> None:
    n, steps = 40_000, 20
    generator = torch.Generator().manual_seed(2)
    x0 = torch.randn(n, 2, generator=generator)
    samples = sample_sde(GaussianVelocity(), x0, steps, generator=generator)
    assert isinstance(samples, torch.Tensor) and samples.shape == (n, 2)
    _, expected = _euler_maruyama_moments(steps)
    # SE(var) = sqrt(2/n) = 0.007, SE(mean) = 0.005 per coordinate.
    assert (samples.var(0) - expected).abs().max() < 0.025
    assert samples.mean(0).abs().max() < 0.02
    mean = torch.tensor([2.0, -1.0])
    shifted = sample_sde(GaussianVelocity(mean=mean), x0, steps, generator=generator)
    exact = torch.tensor([_euler_maruyama_moments(steps, mean=float(m))[0] for m in mean])
    assert (shifted.mean(0) - exact).abs().max() < 0.02


def test_sde_trajectory_records_states_and_velocities() -> None:
    n, steps = 20_000, 40
    generator = torch.Generator().manual_seed(3)
    x0 = torch.randn(n, 2, generator=generator)
    velocity = GaussianVelocity()
    traj = sample_sde(velocity, x0, steps, generator=torch.Generator().manual_seed(4), return_trajectory=True)
    assert isinstance(traj, Trajectory)
    assert traj.xs.shape == (steps + 1, n, 2) and traj.steps == steps and traj.h == 1 / steps
    assert traj.offset == traj.h and traj.velocities is not None and traj.velocities.shape == (steps, n, 2)
    torch.testing.assert_close(traj.ts, time_grid(steps))
    torch.testing.assert_close(traj.xs[0], x0)
    end = sample_sde(velocity, x0, steps, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(traj.x1, end)
    k = 7
    torch.testing.assert_close(traj.velocities[k], velocity(traj.xs[k], traj.ts[k].expand(n)))
    # Each step is Euler-Maruyama: the increment minus the drift is Gaussian with variance h sigma_k^2.
    for k in (0, steps - 1):
        t, h, x = k / steps, traj.h, traj.xs[k]
        noise = traj.xs[k + 1] - x - h * sde_drift(velocity(x, traj.ts[k].expand(n)), x, t, h)
        assert abs(float(noise.var()) / (h * float(sigma(t, h)) ** 2) - 1) < 0.05
    # Memoryless: the end point is almost uncorrelated with the start (exactly so as the offset -> 0).
    correlation = torch.corrcoef(torch.stack([x0[:, 0], traj.x1[:, 0]]))[0, 1]
    assert abs(float(correlation)) < 0.1
    assert not traj.xs.requires_grad


def test_samplers_validate_inputs() -> None:
    velocity = GaussianVelocity()
    with pytest.raises(ValueError):
        sample_ode(velocity, torch.zeros(3, 2), torch.tensor([0.0, 0.5, 0.4]))
    with pytest.raises(ValueError):
        sample_ode(velocity, torch.zeros(3), time_grid(4))
    with pytest.raises(ValueError):
        sample_sde(velocity, torch.zeros(3, 2), 0)
    with pytest.raises(ValueError, match="offset"):
        sample_sde(velocity, torch.zeros(3, 2), 4, offset=0.0)
    assert float(gaussian_velocity_coefficient(torch.tensor(0.0))) == -1.0
