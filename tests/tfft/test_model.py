"""Flow model and flow-matching loss against closed forms (DESIGN.md sections 2, 6, 7)."""

from __future__ import annotations


import pytest
import torch

from tfft.model import GaussianVelocity, VelocityMLP, flow_matching_loss, gaussian_velocity_coefficient
from tfft.sampling import sample_ode, time_grid




def _train(
    model: torch.nn.Module,
    data: torch.Tensor,
    steps: int,
    *,
    lr: float,
    seed: int,
    batch: int = 256,
    weights: torch.Tensor | None = None,
) -> None:
    """Adam on flow_matching_loss: minibatches of `batch`, or with weights the whole bank every step (section 7)."""
    generator = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, steps)
    for _ in range(steps):
        if weights is None:
            x1 = data[torch.randint(len(data), (batch,), generator=generator)]
            loss = flow_matching_loss(model, x1, generator=generator)
        else:
            loss = flow_matching_loss(model, data, weights=weights, generator=generator)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()


def test_velocity_mlp_shapes_times_and_rebuild() -> None:
    torch.manual_seed(0)
    model = VelocityMLP(dim=3, hidden=32, depth=2, time_features=8)
    x = torch.randn(5, 3)
    t = torch.full((5,), 0.3)
    out = model(x, t)
    assert out.shape == (5, 3)
    torch.testing.assert_close(model(x, torch.tensor(0.3)), out)
    torch.testing.assert_close(model(x, 0.3), out)
    rebuilt = VelocityMLP(**model.config)
    rebuilt.load_state_dict(model.state_dict())
    torch.testing.assert_close(rebuilt(x, t), out)
    assert model.config == {"dim": 3, "hidden": 32, "depth": 2, "time_features": 8}


@pytest.mark.parametrize(
    "kwargs", [{"dim": 0}, {"dim": 2, "depth": 0}, {"dim": 2, "time_features": 7}, {"dim": 2, "hidden": 0}]
)
def test_velocity_mlp_rejects_bad_config(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        VelocityMLP(**kwargs)


@pytest.mark.parametrize("t", [0.1, 0.5, 0.8])
def test_gaussian_velocity_is_the_conditional_mean(t: float) -> None:
    # For x1 ~ N(m, I), E[x1 - x0 | x_t] is affine in x_t: least squares recovers slope c(t) and the intercept.
    generator = torch.Generator().manual_seed(1)
    n, mean = 200_000, torch.tensor([1.5, -0.5], dtype=torch.float64)
    x1 = mean + torch.randn(n, 2, generator=generator, dtype=torch.float64)
    x0 = torch.randn(n, 2, generator=generator, dtype=torch.float64)
    x_t = t * x1 + (1 - t) * x0
    for j in range(2):
        design = torch.stack([torch.ones(n, dtype=torch.float64), x_t[:, j]], dim=1)
        intercept, slope = torch.linalg.lstsq(design, (x1 - x0)[:, j : j + 1]).solution[:, 0]
        c = float(gaussian_velocity_coefficient(torch.tensor(t)))
        # Standard errors are about 1/sqrt(n) = 0.002 (residual sd <= 1.5): 0.02 is ~10 of them.
        assert abs(float(slope) - c) < 0.02
        assert abs(float(intercept) - float(mean[j]) * (1 - c * t)) < 0.02
    velocity = GaussianVelocity(mean=mean.float())
    x = torch.randn(4, 2)
    expected = mean.float() + gaussian_velocity_coefficient(torch.tensor(t)) * (x - t * mean.float())
    torch.testing.assert_close(velocity(x, torch.full((4,), t)), expected)


def test_gaussian_velocity_minimises_flow_matching_loss() -> None:
    # L(v* + delta) - L(v*) = E||delta||^2 + 2 E<v* - (x1 - x0), delta>; the cross term has mean 0, and with
    # common random numbers it is a mean of n centred terms (sd about 2|delta|sqrt(1.5)/sqrt(n) ~ 0.003).
    n, dim = 100_000, 2
    x1 = torch.randn(n, dim, generator=torch.Generator().manual_seed(2))
    exact = GaussianVelocity()

    def loss(velocity: GaussianVelocity | object) -> float:
        return float(flow_matching_loss(velocity, x1, generator=torch.Generator().manual_seed(3)))

    best = loss(exact)
    delta = torch.tensor([0.3, -0.2])
    shifted = loss(lambda x, t: exact(x, t) + delta)
    scaled = loss(lambda x, t: 1.2 * exact(x, t))
    assert best < shifted and best < scaled
    assert abs((shifted - best) - float(delta.pow(2).sum())) < 0.02
    # Irreducible part: E Var(x1 - x0 | x_t) = d E[2 - (2t-1)^2 / s(t)] with s(t) = t^2 + (1-t)^2.
    t = torch.linspace(0, 1, 100_001, dtype=torch.float64)
    irreducible = dim * float(torch.trapezoid(2 - (2 * t - 1) ** 2 / (t**2 + (1 - t) ** 2), t))
    assert abs(best - irreducible) < 0.03


def test_weighted_loss_one_hot_equals_single_sample() -> None:
    torch.manual_seed(4)
    model = VelocityMLP(dim=2, hidden=16, depth=2)
    x1 = torch.randn(6, 2)
    t, x0 = torch.rand(6), torch.randn(6, 2)
    for i in range(6):
        one_hot = torch.zeros(6)
        one_hot[i] = 3.0  # normalised inside
        weighted = flow_matching_loss(model, x1, weights=one_hot, t=t, x0=x0)
        alone = flow_matching_loss(model, x1[i : i + 1], t=t[i : i + 1], x0=x0[i : i + 1])
        torch.testing.assert_close(weighted, alone)
    # With a generator: draws are t = rand(n) then x0 = randn(n, d); replay them for sample 2.
    one_hot = torch.zeros(6)
    one_hot[2] = 1.0
    weighted = flow_matching_loss(model, x1, weights=one_hot, generator=torch.Generator().manual_seed(5))
    replay = torch.Generator().manual_seed(5)
    t_replay = torch.rand(6, generator=replay)
    x0_replay = torch.randn(6, 2, generator=replay)
    alone = flow_matching_loss(model, x1[2:3], t=t_replay[2:3], x0=x0_replay[2:3])
    torch.testing.assert_close(weighted, alone)
    uniform = flow_matching_loss(model, x1, weights=torch.full((6,), 0.7), generator=torch.Generator().manual_seed(6))
    plain = flow_matching_loss(model, x1, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(uniform, plain)


@pytest.mark.parametrize("weights", [torch.tensor([1.0, -1.0, 1.0]), torch.zeros(3), torch.ones(2)])
def test_weighted_loss_rejects_bad_weights(weights: torch.Tensor) -> None:
    with pytest.raises(ValueError):
        flow_matching_loss(GaussianVelocity(), torch.randn(3, 2), weights=weights)


def test_pretraining_matches_gaussian_mixture_moments() -> None:
    torch.manual_seed(7)
    generator = torch.Generator().manual_seed(8)
    centres = torch.tensor([[-2.0, 0.0], [2.0, 0.0]])
    data = centres[torch.randint(2, (20_000,), generator=generator)] + 0.5 * torch.randn(20_000, 2, generator=generator)
    model = VelocityMLP(dim=2, hidden=64, depth=3)
    _train(model, data, 400, lr=3e-3, seed=9)
    samples = sample_ode(model, torch.randn(10_000, 2, generator=generator), time_grid(100))
    # Mixture: mean 0, cov diag(4 + 0.25, 0.25). Sampling error alone is ~0.02 on the mean; the tolerances
    # are for a short training run.
    mean, cov = samples.mean(0), torch.cov(samples.T)
    assert mean.abs().max() < 0.2
    assert abs(float(cov[0, 0]) - 4.25) < 0.5
    assert abs(float(cov[1, 1]) - 0.25) < 0.1
    assert abs(float(cov[0, 1])) < 0.2


def test_weighted_flow_matching_reaches_tilted_target() -> None:
    # DESIGN.md section 7: with w_i ∝ exp(c·x_i / gamma) on a bank from q = N(0, I), weighted flow matching
    # started from the pretrained model samples p* = N(c/gamma, I). Tilt 0.5 per coordinate: ESS = N e^{-0.5}.
    torch.manual_seed(10)
    generator = torch.Generator().manual_seed(11)
    model = VelocityMLP(dim=2, hidden=64, depth=2)
    _train(model, torch.randn(20_000, 2, generator=generator), 300, lr=3e-3, seed=12)
    bank = sample_ode(model, torch.randn(4096, 2, generator=generator), time_grid(50))
    base_mean = sample_ode(model, torch.randn(10_000, 2, generator=generator), time_grid(50)).mean(0)
    tilt = torch.tensor([0.5, 0.5])  # c / gamma
    log_w = bank @ tilt
    weights = torch.exp(log_w - log_w.max())
    bank_target = (weights[:, None] * bank).sum(0) / weights.sum()
    _train(model, bank, 300, lr=2e-3, seed=13, weights=weights)
    tuned_mean = sample_ode(model, torch.randn(10_000, 2, generator=generator), time_grid(50)).mean(0)
    assert base_mean.abs().max() < 0.15
    # The bank's self-normalised mean has sd ~ 1/sqrt(ESS ~ 2500) = 0.02; fitting error dominates.
    assert (tuned_mean - bank_target).abs().max() < 0.12
    assert (tuned_mean - tilt).abs().max() < 0.15
