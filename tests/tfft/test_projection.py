"""tfft.projection: the pair Jacobian against autograd, the Gauss-Newton step's first-order claim, the stability
claim on Euler steps (every mode alike, where the force model is bounded by its stiffest one), and the velocity's
composition."""

from __future__ import annotations

import pytest
import torch

from tfft.projection import ProjectingVelocity, gauss_newton_step, pair_jacobian
from tfft.restoring import RestoringVelocity

SCALE = 0.3


def _chain() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A bent four-atom chain: three bonds (kind 0) and two 1-3 pairs (kind 1), all independent; rest lengths
    differ from the reference's, so the reference itself is strained."""
    reference = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [1.3, 0.9, 0.0], [2.4, 1.1, 0.4]]).reshape(-1)
    pairs = torch.tensor([[0, 1], [1, 2], [2, 3], [0, 2], [1, 3]])
    rest = torch.tensor([1.1, 0.9, 1.2, 1.7, 1.9])
    kinds = torch.tensor([0, 0, 0, 1, 1])
    return reference, pairs, rest, kinds


def _errors(z: torch.Tensor, reference: torch.Tensor, pairs: torch.Tensor, rest: torch.Tensor) -> torch.Tensor:
    x = (reference + SCALE * z).view(z.shape[0], -1, 3)
    return ((x[:, pairs[:, 0]] - x[:, pairs[:, 1]]).norm(dim=-1) - rest) / SCALE


def test_the_pair_jacobian_is_the_autograd_jacobian_of_the_errors() -> None:
    reference, pairs, rest, _ = _chain()
    z = 0.5 * torch.randn(3, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    errors, jac = pair_jacobian(z, reference.double(), pairs, rest.double(), SCALE)
    torch.testing.assert_close(errors, _errors(z, reference.double(), pairs, rest.double()))
    for row in range(3):
        exact = torch.autograd.functional.jacobian(
            lambda zz: _errors(zz[None], reference.double(), pairs, rest.double())[0], z[row])
        torch.testing.assert_close(jac[row], exact, rtol=1e-10, atol=1e-12)


def test_the_gauss_newton_step_removes_each_pairs_fraction_of_its_error_to_first_order() -> None:
    """Independent pairs: J delta = -f e (up to the damping), and delta is the least-norm such step (it lies in
    the row space of J)."""
    reference, pairs, rest, _ = _chain()
    z = 0.2 * torch.randn(4, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    errors, jac = pair_jacobian(z, reference.double(), pairs, rest.double(), SCALE)
    fraction = torch.rand(4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    delta = gauss_newton_step(errors, jac, fraction, damping=1e-10)
    torch.testing.assert_close((jac @ delta[..., None]).squeeze(-1), -fraction * errors, rtol=1e-6, atol=1e-8)
    coefficients = torch.linalg.lstsq(jac.transpose(1, 2), delta[..., None]).solution
    torch.testing.assert_close((jac.transpose(1, 2) @ coefficients).squeeze(-1), delta, rtol=1e-8, atol=1e-10)


def _strain_trace(model: RestoringVelocity, steps: int) -> list[float]:
    """Sum of squared pair errors after each of ``steps`` Euler steps of dz/dt = 2 * correction(z, t) (2: the SDE's
    largest factor on the velocity) from strained structures, every rate at its largest value (beta = 1)."""
    reference, pairs, rest, _ = _chain()
    with torch.no_grad():
        model.rate_head.bias.fill_(30.0)  # sigmoid = 1
    z = 0.3 * torch.randn(16, 12, generator=torch.Generator().manual_seed(3))
    grid = torch.linspace(0.0, 1.0, steps + 1)
    trace = [float(_errors(z, reference, pairs, rest).square().sum())]
    with torch.no_grad():
        for k in range(steps):
            t, h = grid[k].expand(16), float(grid[k + 1] - grid[k])
            z = z + h * 2.0 * model.correction(z, t)
            trace.append(float(_errors(z, reference, pairs, rest).square().sum()))
    return trace


@pytest.mark.parametrize("steps", [4, 20, 200])
def test_the_projection_at_its_largest_rate_relaxes_every_pair_without_overshoot(steps: int) -> None:
    """The docstring's stability claim: the squared error never grows along the steps and ends below 0.1% of its
    start; the force model at its own largest rate, on the same chain and steps, leaves far more (its step is
    bounded by the stiffest mode)."""
    reference, pairs, rest, kinds = _chain()
    projecting = ProjectingVelocity(reference, pairs, rest, torch.ones(5), kinds, scale=SCALE, hidden=8, depth=1)
    trace = _strain_trace(projecting, steps)
    assert all(after <= before * (1 + 1e-4) + 1e-6 for before, after in zip(trace, trace[1:]))
    assert trace[-1] < 1e-3 * trace[0]
    force = RestoringVelocity(reference, pairs, rest, torch.ones(5), kinds, scale=SCALE, hidden=8, depth=1)
    assert _strain_trace(force, steps)[-1] > 10 * trace[-1]


def test_the_velocity_is_the_mlp_plus_the_scaled_step_and_its_rates_learn() -> None:
    reference, pairs, rest, kinds = _chain()
    model = ProjectingVelocity(reference, pairs, rest, torch.ones(5), kinds, scale=SCALE, hidden=16, depth=2,
                               initial_rate=0.25, floor=0.05, damping=1e-3)
    z, t = torch.randn(5, 12), torch.rand(5)
    errors, jac = pair_jacobian(z, reference, pairs, rest, SCALE)
    expected = model.mlp(z, t) + gauss_newton_step(errors, jac, 0.25 / (1.0 - t + 0.05)[:, None].expand(5, 5), 1e-3)
    torch.testing.assert_close(model(z, t), expected, rtol=1e-5, atol=1e-5)
    model(z, t).square().sum().backward()
    assert model.rate_head.bias.grad.abs().sum() > 0


def test_a_non_positive_damping_names_itself() -> None:
    reference, pairs, rest, kinds = _chain()
    with pytest.raises(ValueError, match="damping"):
        ProjectingVelocity(reference, pairs, rest, torch.ones(5), kinds, scale=SCALE, damping=0.0)


def test_on_redundant_pairs_the_damped_step_still_removes_the_error() -> None:
    """Four bonds and six 1-3 pairs about one centre: J J^T is singular (10 pairs, 9 internal degrees of freedom),
    the damping keeps the factorisation finite, and one full step from a displaced structure whose rest lengths
    are consistent removes almost all of the squared error (first order: the rest is the step's curvature)."""
    star = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.1, 0.0], [-0.4, 0.9, 0.1], [-0.3, -0.5, 0.8], [-0.2, -0.4, -0.9]],
                        dtype=torch.float64).reshape(-1)
    pairs = torch.tensor([[0, 1], [0, 2], [0, 3], [0, 4]] + [[a, b] for a in range(1, 5) for b in range(a + 1, 5)])
    rest = _errors(torch.zeros(1, 15, dtype=torch.float64), star, pairs, torch.zeros(10, dtype=torch.float64))[0]
    rest = rest * SCALE  # the star's own lengths: consistent, redundant constraints
    z = 0.05 * torch.randn(6, 15, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    errors, jac = pair_jacobian(z, star, pairs, rest, SCALE)
    assert int(torch.linalg.matrix_rank(jac[0])) == 9
    stepped = z + gauss_newton_step(errors, jac, torch.ones_like(errors), damping=1e-2)
    before, after = errors.square().sum(1), _errors(stepped, star, pairs, rest).square().sum(1)
    assert bool(torch.isfinite(after).all()) and bool((after < 0.01 * before).all())


def test_a_diverged_row_gets_a_nan_step_and_leaves_the_others_alone() -> None:
    """A non-finite structure in a batch (a diverged sample) must not stop the sampler: its row is NaN, the rest
    are what they are alone."""
    reference, pairs, rest, kinds = _chain()
    model = ProjectingVelocity(reference, pairs, rest, torch.ones(5), kinds, scale=SCALE, hidden=8, depth=1)
    z, t = torch.randn(4, 12, generator=torch.Generator().manual_seed(6)), torch.rand(4)
    alone = model.correction(z, t)
    z_bad = z.clone()
    z_bad[1, 0] = float("inf")
    z_bad[2, 3] = float("nan")
    out = model.correction(z_bad, t)
    assert torch.isnan(out[1]).all() and torch.isnan(out[2]).all()
    torch.testing.assert_close(out[[0, 3]], alone[[0, 3]])
