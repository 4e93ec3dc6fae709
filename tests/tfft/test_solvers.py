"""The solvers' shipped pieces: oversampling weights, weighted flow matching, the pseudo-reward signal."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from tfft.model import gaussian_velocity_coefficient
from tfft.pseudo import pseudo_reward_signal
from tfft.solvers import WeightedFlowMatchingSolver, oversample_weights
from tfft.target import tilt_weights


def test_oversample_weights_are_unbiased_and_favour_the_tail() -> None:
    n_pool, batch = 400, 64
    generator = torch.Generator().manual_seed(0)
    active = torch.zeros(n_pool, dtype=torch.bool)
    active[:20] = True  # 5% active, as in a right tail at alpha 0.05
    valid = torch.ones(n_pool, dtype=torch.bool)
    valid[-40:] = False
    f = torch.linspace(-1.0, 3.0, n_pool, dtype=torch.float64) ** 2
    exact = float(f[valid].mean())
    estimates, kept_active, kept = [], [], []
    for _ in range(3000):
        w = oversample_weights(active, valid, batch, generator=generator)
        assert bool((w[~valid] == 0).all())
        estimates.append(float((w * f).sum()))
        kept_active.append(int((w[active] > 0).sum()))
        kept.append(int((w > 0).sum()))
    mean_estimate = sum(estimates) / len(estimates)
    spread = (sum((e - mean_estimate) ** 2 for e in estimates) / len(estimates)) ** 0.5
    assert abs(mean_estimate - exact) < 4 * spread / math.sqrt(len(estimates))
    assert min(kept_active) == 20  # every active trajectory is kept (20 < batch / 2)
    assert abs(sum(kept) / len(kept) - batch) < 1.0
    none = oversample_weights(active, torch.zeros(n_pool, dtype=torch.bool), batch, generator=generator)
    assert float(none.sum()) == 0.0


class LearnedMean(nn.Module):
    """The exact velocity family of N(m, I) data with a learnable m: flow matching recovers the data mean."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.mean = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        c = gaussian_velocity_coefficient(t)[:, None]
        return self.mean + c * (x - t[:, None] * self.mean)


def test_weighted_flow_matching_reaches_the_tilted_mean() -> None:
    # Bank from q = N(0, I), r = x_0, mean objective with gamma = 2: the target is N((0.5, 0), I).
    generator = torch.Generator().manual_seed(1)
    bank = torch.randn(20_000, 2, generator=generator)
    weights = torch.as_tensor(tilt_weights(bank[:, 0].numpy(), eta=None, side="right", alpha=1.0, kl_weight=2.0))
    model = LearnedMean(2)
    solver = WeightedFlowMatchingSolver(model, bank, weights)
    assert 15_000 < solver.ess < 20_000  # exp(-1/4) of the bank for this tilt
    optimiser = torch.optim.Adam(model.parameters(), lr=2e-2)
    index_generator = torch.Generator().manual_seed(2)
    for _ in range(400):
        result = solver.step(256, generator, index_generator=index_generator)
        optimiser.zero_grad()
        result.loss.backward()
        optimiser.step()
    assert float(result.metrics["batch"]) == 256
    weighted_mean = (weights[:, None].float() * bank).sum(0)
    torch.testing.assert_close(model.mean.detach(), weighted_mean, atol=0.06, rtol=0)
    assert abs(float(model.mean.detach()[0]) - 0.5) < 0.08
    with pytest.raises(ValueError, match="bank_weights"):
        WeightedFlowMatchingSolver(model, bank, torch.zeros(20_000))


def test_pseudo_reward_signal() -> None:
    r = torch.tensor([0.0, 2.0, float("nan"), 5.0])
    grad = torch.tensor([[1.0, 0.0], [3.0, 4.0], [1.0, 1.0], [0.0, 10.0]])
    valid = torch.tensor([True, True, True, True])
    out = pseudo_reward_signal(r, grad, valid, eta=1.0, side="right", alpha=0.5, grad_clip=5.0)
    assert out.valid.tolist() == [True, True, False, True]
    torch.testing.assert_close(out.value, torch.tensor([0.0, 2.0, 0.0, 8.0]))
    torch.testing.assert_close(out.grad, torch.tensor([[0.0, 0.0], [6.0, 8.0], [0.0, 0.0], [0.0, 10.0]]))
    assert out.active.tolist() == [False, True, False, True]
    left = pseudo_reward_signal(r, grad, valid, eta=1.0, side="left", alpha=0.5)
    torch.testing.assert_close(left.value, torch.tensor([-2.0, 0.0, 0.0, 0.0]))
    assert left.active.tolist() == [True, False, False, False]
    mean = pseudo_reward_signal(r, grad, valid, eta=None, side="right", alpha=1.0)
    torch.testing.assert_close(mean.grad[1], grad[1])
    with pytest.raises(ValueError, match="grad_clip"):
        pseudo_reward_signal(r, grad, valid, eta=1.0, side="right", alpha=0.5, grad_clip=-1.0)
