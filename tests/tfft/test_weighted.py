"""The anchored weighted flow-matching loss (`tfft.weighted`): same minimiser as the plain loss where the base is
its samples' velocity, no pull where the tilt is flat, less gradient noise on a CVaR tilt."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from tfft.model import gaussian_velocity_coefficient
from tfft.target import tilt_weights
from tfft.weighted import WeightedFlowMatchingSolver


class LearnedMean(nn.Module):
    """The exact velocity family of N(m, I) data, m learnable (starts at ``start``)."""

    def __init__(self, start: Tensor) -> None:
        super().__init__()
        self.mean = nn.Parameter(start.clone())

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        c = gaussian_velocity_coefficient(t)[:, None]
        return self.mean + c * (x - t[:, None] * self.mean)


def _fit(solver: WeightedFlowMatchingSolver, model: LearnedMean, steps: int, lr: float = 2e-2) -> Tensor:
    generator, index_generator = torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        result = solver.step(256, generator, index_generator=index_generator)
        optimiser.zero_grad()
        result.loss.backward()
        optimiser.step()
    return model.mean.detach()


def test_anchored_loss_reaches_the_tilted_mean() -> None:
    # q = N(0, I), the base is q's exact velocity; r = x_0, mean objective, gamma = 2: the target is N((0.5, 0), I).
    bank = torch.randn(20_000, 2, generator=torch.Generator().manual_seed(1))
    weights = torch.as_tensor(tilt_weights(bank[:, 0].numpy(), eta=None, side="right", alpha=1.0, kl_weight=2.0))
    base = LearnedMean(torch.zeros(2)).requires_grad_(False)
    model = LearnedMean(torch.zeros(2))
    solver = WeightedFlowMatchingSolver(model, bank, weights, base=base)
    assert solver.active_fraction > 0.999  # every row but the median one is tilted
    mean = _fit(solver, model, 400)
    torch.testing.assert_close(mean, (weights[:, None].float() * bank).sum(0), atol=0.06, rtol=0)
    assert abs(float(mean[0]) - 0.5) < 0.08


def test_a_flat_tilt_leaves_the_base_where_it_is() -> None:
    # The base model is off its samples (mean 0.3 for N(0, I) data): plain flow matching on a uniform bank refits
    # it to the bank; the anchored loss has exactly zero gradient, whatever the batch.
    bank = torch.randn(5_000, 2, generator=torch.Generator().manual_seed(2))
    uniform = torch.ones(5_000)
    start = torch.tensor([0.3, -0.3])
    base = LearnedMean(start).requires_grad_(False)
    anchored = LearnedMean(start)
    solver = WeightedFlowMatchingSolver(anchored, bank, uniform, base=base)
    result = solver.step(64, torch.Generator().manual_seed(0), index_generator=torch.Generator().manual_seed(1))
    result.loss.backward()
    assert float(anchored.mean.grad.abs().max()) == 0.0
    assert float(result.metrics["active_fraction"]) == 0.0
    plain = LearnedMean(start)
    refit = _fit(WeightedFlowMatchingSolver(plain, bank, uniform), plain, 300)
    assert float(refit.abs().max()) < 0.08  # pulled to the bank's mean, away from the base's 0.3


def test_anchored_gradient_is_less_noisy_on_a_cvar_tilt() -> None:
    # Right-CVaR(0.1) tilt of r = x_0 (eta at the 90% quantile, gamma 10): 10% of the rows are tilted. At the base,
    # the plain gradient is flow-matching noise from every row, the anchored one comes from the tail rows only.
    bank = torch.randn(20_000, 2, generator=torch.Generator().manual_seed(3))
    eta = float(torch.quantile(bank[:, 0], 0.9))
    weights = torch.as_tensor(tilt_weights(bank[:, 0].numpy(), eta=eta, side="right", alpha=0.1, kl_weight=10.0))
    base = LearnedMean(torch.zeros(2)).requires_grad_(False)

    def gradients(anchor: bool) -> Tensor:
        model = LearnedMean(torch.zeros(2))
        solver = WeightedFlowMatchingSolver(model, bank, weights, base=base if anchor else None)
        generator, index_generator = torch.Generator().manual_seed(7), torch.Generator().manual_seed(8)
        out = []
        for _ in range(300):
            model.zero_grad()
            solver.step(128, generator, index_generator=index_generator).loss.backward()
            out.append(model.mean.grad.clone())
        return torch.stack(out)

    plain, anchored = gradients(False), gradients(True)
    # Same expected direction (towards larger x_0); the second coordinate is untilted: anchored noise is far smaller.
    assert float(plain[:, 0].mean()) < 0 and float(anchored[:, 0].mean()) < 0
    assert abs(float(anchored[:, 0].mean()) / float(plain[:, 0].mean()) - 1.0) < 0.35
    assert float(anchored[:, 1].std()) < 0.5 * float(plain[:, 1].std())


def test_active_share_is_checked() -> None:
    bank = torch.randn(10, 2)
    with pytest.raises(ValueError, match="active_share"):
        WeightedFlowMatchingSolver(LearnedMean(torch.zeros(2)), bank, torch.ones(10), base=LearnedMean(torch.zeros(2)),
                                   active_share=1.0)


def test_draw_times_has_the_stated_density() -> None:
    from tfft.weighted import draw_times

    t = draw_times(200_000, 3.0, generator=torch.Generator().manual_seed(0))
    assert float(t.min()) >= 0.0 and float(t.max()) <= 1.0
    assert abs(float(t.mean()) - 0.75) < 3e-3  # density 3 t^2: mean k / (k + 1)
    assert abs(float((t < 0.5).double().mean()) - 0.125) < 3e-3  # P(t < 1/2) = 2^-3
    with pytest.raises(ValueError, match="time_power"):
        draw_times(3, 0.0)


def test_late_times_keep_the_minimiser() -> None:
    # The same tilted-mean problem as above with times favouring t near 1: the minimiser does not move.
    bank = torch.randn(20_000, 2, generator=torch.Generator().manual_seed(4))
    weights = torch.as_tensor(tilt_weights(bank[:, 0].numpy(), eta=None, side="right", alpha=1.0, kl_weight=2.0))
    base = LearnedMean(torch.zeros(2)).requires_grad_(False)
    model = LearnedMean(torch.zeros(2))
    mean = _fit(WeightedFlowMatchingSolver(model, bank, weights, base=base, time_power=3.0), model, 400)
    torch.testing.assert_close(mean, (weights[:, None].float() * bank).sum(0), atol=0.06, rtol=0)
