"""Adjoint Matching against closed forms and brute force (DESIGN.md section 6).

Closed-form case: base q = N(0, I) with v_base(x, t) = c(t) x, c(t) = (2t - 1)/(t^2 + (1 - t)^2), linear reward
r(x) = w·x, KL weight gamma; the target is p* = N(w/gamma, I) and KL(p* || q) = ||w/gamma||^2 / 2.
"""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from torch import Tensor, nn

from tfft.adjoint import girsanov_kl, lean_adjoint, select_time_steps
from tfft.conditioning import Conditioning
from tfft.matching import adjoint_matching_loss
from tfft.model import GaussianMixtureVelocity, GaussianVelocity, VelocityMLP
from tfft.pseudo import PseudoReward, pseudo_reward_signal
from tfft.sampling import Trajectory, sample_sde, sde_drift, sigma, velocity_gain
from tfft.solvers import AdjointMatchingConfig, AdjointMatchingSolver


def _perfect_fit_mean(steps: int) -> float:
    """Mean of X_K (per unit of w/gamma) when v_theta - v_base equals each step's loss minimiser
    -sigma_k^2 a_{k+1} / lambda_k, with a from the lean-adjoint recursion: the scheme's own optimum."""
    h = 1.0 / steps
    slope = [1.0 + h * (velocity_gain(k * h, h) * (2 * k * h - 1) / ((k * h) ** 2 + (1 - k * h) ** 2) - 1 / (k * h + h))
             for k in range(steps)]
    adjoint = [0.0] * (steps + 1)
    adjoint[steps] = -1.0
    for k in range(steps - 1, -1, -1):
        adjoint[k] = slope[k] * adjoint[k + 1]
    mean = 0.0
    for k in range(steps):
        mean = slope[k] * mean - h * float(sigma(k * h, h)) ** 2 * adjoint[k + 1]
    return mean


class TimeShift(nn.Module):
    """v_theta(x, t) = v_base(x, t) + a_phi(t): an MLP of Fourier features of t, zero at initialisation."""

    def __init__(self, base: nn.Module, dim: int, hidden: int = 64, frequencies: int = 8) -> None:
        super().__init__()
        self.base = base
        self.register_buffer("omega", math.pi * torch.arange(1, frequencies + 1, dtype=torch.float32))
        self.net = nn.Sequential(
            nn.Linear(2 * frequencies + 1, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, dim),
        )
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        angles = t[:, None] * self.omega
        features = torch.cat([t[:, None], torch.sin(angles), torch.cos(angles)], dim=1)
        return self.base(x, t) + self.net(features)


def _linear_reward(w: Tensor):
    def fn(x1: Tensor) -> PseudoReward:
        r = x1 @ w
        return pseudo_reward_signal(r, w.expand_as(x1).clone(), torch.ones_like(r, dtype=torch.bool),
                                    eta=None, side="right", alpha=1.0)
    return fn


def _fine_tune(
    steps: int, iterations: int, seed: int, *, fast: bool = True, device: str = "cpu",
    autocast: torch.dtype | None = None,
) -> tuple[TimeShift, Tensor, dict[str, Tensor]]:
    """Adjoint Matching on r(x) = w·x, w = (1, -0.5), gamma = 0.5: target N((2, -1), I); the model ends on CPU."""
    torch.manual_seed(seed)
    generator = torch.Generator(device=device).manual_seed(seed + 1)
    base = GaussianVelocity().to(device)
    model = TimeShift(base, dim=2).to(device)
    w, kl_weight = torch.tensor([1.0, -0.5], device=device), 0.5
    config = AdjointMatchingConfig(kl_weight=kl_weight, steps=steps, late_fraction=1.0, fast=fast, autocast=autocast)
    solver = AdjointMatchingSolver(model, base, _linear_reward(w), config)
    optimiser = torch.optim.Adam(model.net.parameters(), lr=1e-2)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, iterations)
    for _ in range(iterations):
        # The control is x-independent here, so a small batch suffices: the regression is noise-free.
        result = solver.step(torch.randn(16, 2, generator=generator, device=device), generator)
        optimiser.zero_grad()
        result.loss.backward()
        optimiser.step()
        schedule.step()
    return model.cpu(), (w / kl_weight).cpu(), {k: v.cpu() for k, v in result.metrics.items()}


def _sde_mean(model: nn.Module, steps: int) -> Tensor:
    """Exact mean of the model's SDE samples: the drift is affine in x, so the mean follows the noise-free chain."""
    h, m = 1.0 / steps, torch.zeros(1, 2)
    with torch.no_grad():
        for k in range(steps):
            m = m + h * sde_drift(model(m, torch.full((1,), k * h)), m, k * h, h)
    return m[0]


def test_select_time_steps() -> None:
    indices = select_time_steps(40, late_fraction=0.25, n_early=10, generator=torch.Generator().manual_seed(0))
    assert indices.dtype == torch.long
    assert bool((indices[1:] > indices[:-1]).all())
    assert set(range(30, 40)) <= set(indices.tolist())
    assert len(indices) == 20 and int(indices.min()) >= 0
    again = select_time_steps(40, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(indices, again)
    torch.testing.assert_close(select_time_steps(8, late_fraction=0.5, n_early=100), torch.arange(8))
    torch.testing.assert_close(select_time_steps(8, late_fraction=1.0, n_early=0), torch.arange(8))
    for bad in ({"late_fraction": 1.5}, {"n_early": -1}, {"late_fraction": 0.0, "n_early": 0}):
        with pytest.raises(ValueError):
            select_time_steps(8, **bad)


def test_lean_adjoint_is_the_gradient_of_the_euler_chain() -> None:
    # a_k = d(a_K . X_K)/dX_k along X_{k+1} = X_k + h b_base(X_k, t_k) + (fixed noise): brute-force autograd.
    torch.manual_seed(0)
    base = VelocityMLP(dim=3, hidden=16, depth=2).double()
    steps, n = 6, 4
    traj = sample_sde(base, torch.randn(n, 3, dtype=torch.float64), steps, return_trajectory=True)
    terminal = torch.randn(n, 3, dtype=torch.float64)
    adjoint = lean_adjoint(base, traj, terminal)
    assert adjoint.states.shape == traj.xs.shape and not adjoint.states.requires_grad
    assert all(p.grad is None for p in base.parameters())
    torch.testing.assert_close(adjoint.base_velocities, traj.velocities)  # sampled with the base itself
    noise = [traj.xs[k + 1] - traj.xs[k] - traj.h * sde_drift(traj.velocities[k], traj.xs[k], k * traj.h, traj.offset)
             for k in range(steps)]
    for start in range(steps + 1):
        x_start = traj.xs[start].clone().requires_grad_(True)
        x = x_start
        for k in range(start, steps):
            x = x + traj.h * sde_drift(base(x, torch.full((n,), k * traj.h, dtype=x.dtype)), x, k * traj.h,
                                       traj.offset) + noise[k]
        torch.testing.assert_close(x.detach(), traj.xs[-1])  # the chain reproduces the trajectory
        (grad,) = torch.autograd.grad((x * terminal).sum(), x_start) if start < steps else (terminal,)
        torch.testing.assert_close(adjoint.states[start], grad, rtol=1e-10, atol=1e-12)


def test_loss_value_conditioning_and_batched_calls() -> None:
    torch.manual_seed(1)

    class Counting(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner, self.calls = inner, 0

        def forward(self, x: Tensor, t: Tensor) -> Tensor:
            self.calls += 1
            return self.inner(x, t)

    base = GaussianVelocity()
    model = Counting(VelocityMLP(dim=2, hidden=16, depth=2))
    traj = sample_sde(base, torch.randn(5, 2), 10, return_trajectory=True)
    adjoint = lean_adjoint(base, traj, torch.randn(5, 2))
    indices = torch.tensor([0, 3, 7, 9])
    terms = adjoint_matching_loss(model, traj, adjoint, indices)
    assert model.calls == 1
    expected = torch.zeros(())
    for k in indices.tolist():
        t, s, lam = traj.ts[k].expand(5), float(sigma(k * traj.h, traj.h)), velocity_gain(k * traj.h, traj.h)
        residual = (lam / s) * (model(traj.xs[k], t) - base(traj.xs[k], t)) + s * adjoint.states[k + 1]
        expected = expected + residual.pow(2).sum() / (5 * len(indices))
    torch.testing.assert_close(terms.loss, expected)
    torch.testing.assert_close(terms.per_sample.sum(), terms.loss.detach())
    # Conditioning: step k's residual divided by d times the batch mean of ||sigma_k a_{k+1}||^2 / d (first batch).
    conditioning = Conditioning(10, normalize=True, clip_quantile=0.0)
    conditioned = adjoint_matching_loss(model, traj, adjoint, indices, conditioning=conditioning)
    expected = torch.zeros(())
    for k in indices.tolist():
        t, s, lam = traj.ts[k].expand(5), float(sigma(k * traj.h, traj.h)), velocity_gain(k * traj.h, traj.h)
        y = s * adjoint.states[k + 1]
        residual = (lam / s) * (model(traj.xs[k], t) - base(traj.xs[k], t)) + y
        expected = expected + residual.pow(2).sum() / y.pow(2).sum() / len(indices)
        assert math.isclose(float(conditioning.scale[k]), float(y.pow(2).sum()) / 10, rel_tol=1e-5)
    torch.testing.assert_close(conditioned.loss, expected)
    assert math.isnan(float(conditioning.scale[1]))  # unseen steps stay unset
    assert float(conditioned.loss_at_base) > 0 and float(conditioned.clipped_fraction) == 0.0


def test_zero_weight_samples_contribute_nothing() -> None:
    torch.manual_seed(2)
    base = GaussianVelocity()
    model = VelocityMLP(dim=2, hidden=16, depth=2)
    traj = sample_sde(base, torch.randn(4, 2), 8, return_trajectory=True)
    adjoint = lean_adjoint(base, traj, torch.randn(4, 2))
    indices = torch.arange(8)
    mask = torch.tensor([True, False, True, True])
    poisoned = Trajectory(xs=traj.xs.clone(), ts=traj.ts, h=traj.h, offset=traj.offset, velocities=traj.velocities)
    poisoned.xs[:, 1] = float("nan")
    weights = mask.float() / 3

    def loss_and_grads(trajectory: Trajectory, w: Tensor) -> tuple[Tensor, list[Tensor]]:
        model.zero_grad()
        terms = adjoint_matching_loss(model, trajectory, adjoint, indices, sample_weights=w)
        terms.loss.backward()
        return terms.loss.detach(), [p.grad.clone() for p in model.parameters()]

    masked_loss, masked_grads = loss_and_grads(poisoned, weights)
    reference_loss, reference_grads = loss_and_grads(traj, weights)
    torch.testing.assert_close(masked_loss, reference_loss)
    for got, want in zip(masked_grads, reference_grads, strict=True):
        torch.testing.assert_close(got, want)
    none_loss, none_grads = loss_and_grads(poisoned, torch.zeros(4))
    assert float(none_loss) == 0.0 and all(bool((g == 0).all()) for g in none_grads)


def test_solver_skips_invalid_rewards_and_reports() -> None:
    torch.manual_seed(3)
    base = GaussianVelocity()
    model = TimeShift(base, dim=2)

    def fn(x1: Tensor) -> PseudoReward:
        valid = torch.arange(len(x1)) % 2 == 0
        r = torch.where(valid, x1[:, 0], torch.full_like(x1[:, 0], float("nan")))
        grad = torch.ones_like(x1)
        out = pseudo_reward_signal(r, grad, valid, eta=0.0, side="right", alpha=0.5)
        return out

    solver = AdjointMatchingSolver(model, base, fn, AdjointMatchingConfig(kl_weight=1.0, steps=10))
    result = solver.step(torch.randn(8, 2), torch.Generator().manual_seed(0))
    result.loss.backward()
    assert all(bool(torch.isfinite(p.grad).all()) for p in model.net.parameters())
    assert float(result.metrics["valid_fraction"]) == 0.5 and float(result.metrics["batch"]) == 4
    active = float(result.metrics["active_fraction"])
    assert 0 <= active <= 1 and math.isfinite(float(result.metrics["objective"]))
    with pytest.raises(ValueError):
        AdjointMatchingConfig(kl_weight=0.0, steps=10)


@pytest.mark.parametrize(
    "steps, iterations, fast, device, autocast",
    [(20, 300, True, "cpu", None), (40, 300, True, "cpu", None), (20, 300, False, "cpu", None),
     (40, 300, False, "cpu", None), (20, 300, True, "cpu", torch.bfloat16)]
    + [(20, 300, True, "cuda", None), (40, 300, True, "cuda", None), (20, 300, True, "cuda", torch.bfloat16)]
    * torch.cuda.is_available(),
)
def test_fine_tuned_mean_and_kl_reach_the_closed_form(
    steps: int, iterations: int, fast: bool, device: str, autocast: torch.dtype | None
) -> None:
    # Target N(w/gamma, I) = N((2, -1), I): the fine-tuned SDE mean within 0.5% at K = 20 and 40 (the first scheme:
    # 2.406 and 2.205), matching the scheme's own perfect-fit optimum (1.9954 and 1.9987 per 2.0). On the fast
    # path (on CUDA: graphed sampler and adjoint) and on the reference path; with the network calls under bf16
    # autocast too (measured on the CPU: relative error 0.27% at K = 20, as in float32).
    model, target, metrics = _fine_tune(steps=steps, iterations=iterations, seed=10 + steps, fast=fast, device=device,
                                        autocast=autocast)
    prediction = _perfect_fit_mean(steps)
    assert abs(prediction - {20: 0.99768, 40: 0.99936}[steps]) < 1e-4
    mean = _sde_mean(model, steps)
    print(f"\nK = {steps}: fine-tuned SDE mean {mean.tolist()}, target {target.tolist()}, scheme {prediction:.5f}")
    assert bool(((mean - target).abs() <= 0.005 * target.abs()).all())
    # Girsanov KL along the training trajectories: ||w/gamma||^2 / 2 = 2.5 at the optimum.
    assert abs(float(metrics["kl"]) - 2.5) < 0.05
    assert float(metrics["loss"]) < 0.01 * float(metrics["loss_at_base"])


def test_girsanov_kl_matches_the_gaussian_kl() -> None:
    # v_theta = v_base + shift(t) equal to the exact tilt towards N(m, I): KL along the path = ||m||^2 / 2.
    steps, n = 200, 2000
    mean = torch.tensor([1.0, 0.5])
    base, tilted = GaussianVelocity(), GaussianVelocity(mean=mean)
    generator = torch.Generator().manual_seed(5)
    traj = sample_sde(tilted, torch.randn(n, 2, generator=generator), steps, generator=generator, return_trajectory=True)
    adjoint = lean_adjoint(base, traj, torch.zeros(n, 2))
    kl = girsanov_kl(traj, adjoint)
    assert abs(float(kl.mean()) - float(mean.pow(2).sum()) / 2) < 0.02


def _stiff_batch_ess(normalize: bool, clip_quantile: float) -> float:
    """Median over 30 batches of 64 (after 10 warm-up batches) of the per-sample-loss ESS at v_theta = v_base on
    the two-mode flow (modes +-2, width 0.3, K = 60), reward r(x) = x."""
    base = GaussianMixtureVelocity([[-2.0], [2.0]], [0.3, 0.3])

    class Shifted(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.shift = nn.Parameter(torch.zeros(1))

        def forward(self, x: Tensor, t: Tensor) -> Tensor:
            return base(x, t) + self.shift

    solver = AdjointMatchingSolver(
        Shifted(), base, _linear_reward(torch.ones(1)),
        AdjointMatchingConfig(kl_weight=1.0, steps=60, normalize=normalize, clip_quantile=clip_quantile),
    )
    generator = torch.Generator().manual_seed(0)
    ess = [float(solver.step(torch.randn(64, 1, generator=generator), generator).metrics["loss_ess"]) for _ in range(40)]
    return statistics.median(ess[10:])


def test_conditioning_spreads_the_loss_over_the_batch_on_a_stiff_flow() -> None:
    off = _stiff_batch_ess(normalize=False, clip_quantile=0.0)
    clipped = _stiff_batch_ess(normalize=False, clip_quantile=0.9)  # the default: clip at 2 x the 90% quantile
    normalized = _stiff_batch_ess(normalize=True, clip_quantile=0.9)
    print(f"\ntwo-mode flow, batch 64: median loss ESS {off:.1f} without conditioning, {clipped:.1f} with the "
          f"default clip, {normalized:.1f} clipped and normalised")
    # Without conditioning a handful of early-step, near-boundary trajectories carry the loss (measured: about 3).
    assert off < 10
    assert clipped >= 32 and normalized >= 32


def test_conditioning_state_round_trip_and_validation() -> None:
    c = Conditioning(5)
    c.scale[2] = 3.0
    other = Conditioning(5)
    other.load_state_dict(c.state_dict())
    assert float(other.scale[2]) == 3.0 and math.isnan(float(other.scale[0]))
    with pytest.raises(ValueError, match="shape"):
        Conditioning(4).load_state_dict(c.state_dict())
    with pytest.raises(ValueError, match="clip_quantile"):
        Conditioning(5, clip_quantile=1.5)
