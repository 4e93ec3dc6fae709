"""The held-out check of weighted flow matching (`tfft.holdout`) against its closed form, and the solver's split."""

from __future__ import annotations

import math

import pytest
import torch

from tfft.holdout import HoldOut, split_rows
from tfft.model import GaussianVelocity, VelocityMLP
from tfft.weighted import WeightedFlowMatchingSolver

C = 0.5  # tilt exp(C x) of the base N(0, 1): the target is N(C, 1)


def _check(n: int = 40_000, seed: int = 0) -> HoldOut:
    """The check on n draws of the base N(0, 1) with rho = exp(C x) / median, 4 draws per row, float64."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, generator=gen, dtype=torch.float64)
    w = torch.exp(C * x[:, 0])
    times = torch.rand(4, n, generator=gen, dtype=torch.float64)
    noise = torch.randn(4, n, 1, generator=gen, dtype=torch.float64)
    return HoldOut.draw(GaussianVelocity(), x, w / w.median(), times=times, noise=noise)


def test_the_gain_of_the_target_velocity_is_its_closed_form() -> None:
    """L(base) - L(v*) = E[Z ||v_base - v*||^2], Z = E[rho | x_t]. For N(0, 1) tilted by exp(C x):
    v* - v_base = C (1 - t c(t)), E[Z | t] = exp(C^2 / 2) (rho's median is exp(0) = 1) and
    int_0^1 (1 - t c(t))^2 dt = pi / 4, so the gain is C^2 exp(C^2 / 2) pi / 4."""
    exact = C * C * math.exp(C * C / 2) * math.pi / 4
    gain, se = _check().gain(GaussianVelocity([C]))
    assert 0 < se < 0.05 * exact
    assert abs(gain - exact) < 3 * se


def test_the_gain_orders_velocities_by_their_distance_to_the_target() -> None:
    """The velocity of N(m, 1) is v* + (m - C)(1 - t c(t)), so gain(m) / gain(C) = (C^2 - (m - C)^2) / C^2:
    3/4 halfway, 0 at the base and at twice the target's mean, -3 moved the other way."""
    check = _check()
    at_target, _ = check.gain(GaussianVelocity([C]))
    ratios = {m: check.gain(GaussianVelocity([m]))[0] / at_target for m in (C / 2, 2 * C, -C)}
    assert ratios[C / 2] == pytest.approx(0.75, abs=0.05)
    assert ratios[2 * C] == pytest.approx(0.0, abs=0.15)
    assert ratios[-C] == pytest.approx(-3.0, abs=0.2)


def test_the_base_gains_nothing_on_every_row() -> None:
    gains = _check(n=500).gains(GaussianVelocity())
    assert gains.shape == (500,)
    assert torch.equal(gains, torch.zeros(500, dtype=torch.float64))


def test_gains_in_chunks_equal_one_pass() -> None:
    check, model = _check(n=300), GaussianVelocity([0.2])
    assert torch.allclose(check.gains(model, chunk=7), check.gains(model), rtol=0, atol=1e-12)


def test_split_rows_is_a_seeded_partition() -> None:
    train, held = split_rows(100, 0.1, seed=3)
    assert held.numel() == 10 and train.numel() == 90
    assert torch.equal(torch.sort(torch.cat([train, held])).values, torch.arange(100))
    again = split_rows(100, 0.1, seed=3)
    assert torch.equal(again[1], held)
    assert not torch.equal(split_rows(100, 0.1, seed=4)[1], held)
    assert split_rows(3, 0.01, seed=0)[1].numel() == 1  # at least one row on each side
    with pytest.raises(ValueError, match="fraction"):
        split_rows(10, 1.0, seed=0)


def test_the_solver_trains_only_on_rows_outside_the_held_out_ones() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(400, 2, generator=gen)
    w = torch.where(x[:, 0] > 1.0, torch.exp(x[:, 0]), torch.ones(400))  # a right tail: rho = 1 elsewhere
    base = VelocityMLP(2, hidden=16, depth=1).requires_grad_(False)
    model = VelocityMLP(2, hidden=16, depth=1)
    model.load_state_dict(base.state_dict())
    solver = WeightedFlowMatchingSolver(model, x, w, base=base, holdout_fraction=0.25, holdout_seed=5)
    _, held = split_rows(400, 0.25, seed=5)
    trained = torch.cat([solver.active_rows, solver.rest_rows])
    assert trained.numel() == 300 and not set(trained.tolist()) & set(held.tolist())
    assert solver.holdout is not None and solver.holdout.rows == 100
    assert solver.holdout_gain() == (0.0, 0.0)  # the model starts as the base
    with torch.no_grad():
        model.net[-1].bias.add_(0.3)
    assert solver.holdout_gain()[0] != 0.0
    assert WeightedFlowMatchingSolver(model, x, w, base=base).holdout_gain() is None
    with pytest.raises(ValueError, match="anchored"):
        WeightedFlowMatchingSolver(model, x, w, holdout_fraction=0.1)


def test_with_conditions_each_held_out_row_is_checked_under_its_own_condition() -> None:
    """A conditional model whose condition b moves away from the base: only b's held-out rows lose, a's gain 0."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(600, 2, generator=gen)
    cond = torch.arange(600) % 2
    w = torch.where(x[:, 0] > 1.0, torch.exp(x[:, 0]), torch.ones(600))
    base = VelocityMLP(2, hidden=16, depth=1, num_conditions=2).requires_grad_(False)
    with torch.no_grad():
        base.condition_embedding.weight.normal_(generator=gen)
    model = VelocityMLP(2, hidden=16, depth=1, num_conditions=2)
    model.load_state_dict(base.state_dict())
    solver = WeightedFlowMatchingSolver(model, x, w, base=base, bank_cond=cond, holdout_fraction=0.2, holdout_seed=0)
    check = solver.holdout
    assert check is not None and check.cond is not None
    _, held = split_rows(600, 0.2, seed=0)
    assert torch.equal(check.cond[: check.rows], cond[held])
    with torch.no_grad():
        model.condition_embedding.weight[1].add_(3.0)  # condition b only
    gains = check.gains(model)
    in_b = cond[held] == 1
    assert torch.all(gains[~in_b] == 0) and torch.all(gains[in_b] != 0)


def test_one_stratum_still_never_trains_on_held_out_rows() -> None:
    """A flat tilt leaves one stratum (every rho is 1): batches are drawn uniformly from the training rows."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(300, 2, generator=gen)
    base = VelocityMLP(2, hidden=8, depth=1).requires_grad_(False)
    solver = WeightedFlowMatchingSolver(VelocityMLP(2, hidden=8, depth=1), x, torch.ones(300), base=base,
                                        holdout_fraction=0.2, holdout_seed=1)
    assert solver.active_fraction == 0.0
    _, held = split_rows(300, 0.2, seed=1)
    drawn, weights = solver._stratified(4000, torch.Generator().manual_seed(0))
    assert not set(drawn.tolist()) & set(held.tolist()) and len(set(drawn.tolist())) == 240
    assert torch.allclose(weights.sum(), torch.tensor(1.0, dtype=torch.float64))
