"""tfft.restoring: the pair forces against autograd, the Laplacian bound against the exact Hessian, the rate's
stability claim on Euler steps, and the velocity's composition."""

from __future__ import annotations

import pytest
import torch

from tfft.restoring import RestoringVelocity, laplacian_bound, pair_forces

SCALE = 0.3


def _triatomic() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A bent three-atom molecule: two bonds (kind 0) and their 1-3 pair (kind 1); rest lengths differ from the
    reference's, so the reference itself is strained."""
    reference = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [1.3, 0.9, 0.0]]).reshape(-1)
    pairs = torch.tensor([[0, 1], [1, 2], [0, 2]])
    rest = torch.tensor([1.1, 0.9, 1.7])
    kinds = torch.tensor([0, 0, 1])
    return reference, pairs, rest, kinds


def _energy(z: torch.Tensor, reference, pairs, rest, weights, kinds, kind: int) -> torch.Tensor:
    x = (reference + SCALE * z).view(z.shape[0], -1, 3)
    length = (x[:, pairs[:, 0]] - x[:, pairs[:, 1]]).norm(dim=-1)
    e = (length - rest) / SCALE
    return 0.5 * (weights * e * e * (kinds == kind)).sum()


def test_pair_forces_are_minus_the_gradient_of_each_kinds_energy() -> None:
    reference, pairs, rest, kinds = _triatomic()
    weights = torch.tensor([1.0, 2.0, 0.5])
    z = torch.randn(7, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    args = (reference.double(), pairs, rest.double(), weights.double(), kinds)
    forces = pair_forces(z, *args, n_kinds=2, scale=SCALE)
    assert forces.shape == (2, 7, 9)
    for kind in range(2):
        (grad,) = torch.autograd.grad(_energy(z, *args, kind=kind), z)
        torch.testing.assert_close(forces[kind], -grad, rtol=1e-10, atol=1e-12)


def test_the_laplacian_bound_is_the_hessians_largest_eigenvalue_for_one_bond_and_bounds_it_for_a_triangle() -> None:
    one = torch.tensor([[0, 1]])
    assert laplacian_bound(one, torch.ones(1), 2) == pytest.approx(2.0)
    reference, pairs, _, kinds = _triatomic()
    weights = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    # at rest (rest lengths = the reference's own) the Hessian of E is sum_p w_p u_p u_p^T on the pair's atoms
    x = reference.double().view(-1, 3)
    rest = (x[pairs[:, 0]] - x[pairs[:, 1]]).norm(dim=-1)
    hessian = torch.autograd.functional.hessian(
        lambda z: sum(_energy(z[None], reference.double(), pairs, rest, weights, kinds, kind) for kind in (0, 1)),
        torch.zeros(9, dtype=torch.float64))
    largest = float(torch.linalg.eigvalsh(hessian).max())
    bound = laplacian_bound(pairs, weights, 3)
    assert largest <= bound + 1e-9
    assert largest > 0.5 * bound  # a bound, not a loose one


def _relax(steps: int, overdrive: float = 1.0) -> list[float]:
    """The strain after each of ``steps`` Euler steps of dz/dt = 2 c(t) F(z) at the largest rate (beta = 1; 2 is
    the SDE's factor on the velocity), times ``overdrive``, from strained structures."""
    reference, pairs, rest, kinds = _triatomic()
    model = RestoringVelocity(reference, pairs, rest, torch.ones(3), kinds, scale=SCALE, hidden=8, depth=1)
    with torch.no_grad():
        model.rate_head.bias.fill_(30.0)  # sigmoid = 1
    z = 0.3 * torch.randn(16, 9, generator=torch.Generator().manual_seed(1))
    grid = torch.linspace(0.0, 1.0, steps + 1)

    def strain(z: torch.Tensor) -> torch.Tensor:
        return sum(_energy(z, reference, pairs, rest, torch.ones(3), kinds, kind) for kind in (0, 1))

    trace = [float(strain(z))]
    with torch.no_grad():
        for k in range(steps):
            t, h = grid[k].expand(16), float(grid[k + 1] - grid[k])
            force = pair_forces(z, reference, pairs, rest, torch.ones(3), kinds, 2, SCALE)
            z = z + h * 2.0 * overdrive * torch.einsum("nk,knd->nd", model.rates(t), force)
            trace.append(float(strain(z)))
    return trace


@pytest.mark.parametrize("steps", [4, 20, 200])
def test_the_restoring_flow_at_its_largest_rate_relaxes_without_overshoot_for_any_step_count(steps: int) -> None:
    """The docstring's stability claim: the strain never grows along the steps, and ends below 2% of its start
    (measured: 1.0%, 0.44%, 0.29% at 4, 20, 200 steps)."""
    trace = _relax(steps)
    assert all(after <= before * (1 + 1e-4) + 1e-6 for before, after in zip(trace, trace[1:]))
    assert trace[-1] < 0.02 * trace[0]


def test_rates_four_times_the_bound_overshoot_on_coarse_steps() -> None:
    """The bound is what keeps it stable: the same flow driven 4x harder diverges on 4 steps."""
    trace = _relax(4, overdrive=4.0)
    assert trace[-1] > trace[0]


def test_the_velocity_is_the_mlp_plus_the_rated_forces_and_starts_at_the_initial_rate() -> None:
    reference, pairs, rest, kinds = _triatomic()
    model = RestoringVelocity(reference, pairs, rest, torch.ones(3), kinds, scale=SCALE, hidden=16, depth=2,
                              initial_rate=0.25, floor=0.05)
    z, t = torch.randn(5, 9), torch.rand(5)
    rates = model.rates(t)
    expected_rates = 0.25 * model.step_size / (1.0 - t + 0.05)
    torch.testing.assert_close(rates, expected_rates[:, None].expand(5, 2))
    forces = pair_forces(z, reference, pairs, rest, torch.ones(3), kinds, 2, SCALE)
    expected = model.mlp(z, t) + rates[:, :1] * forces[0] + rates[:, 1:] * forces[1]
    torch.testing.assert_close(model(z, t), expected)
    # the rates learn: a gradient reaches the rate head
    model(z, t).square().sum().backward()
    assert model.rate_head.bias.grad.abs().sum() > 0


@pytest.mark.parametrize("bad, message", [
    ({"pairs": torch.zeros(0, 2, dtype=torch.long)}, "pairs"),
    ({"initial_rate": 1.0}, "initial_rate"),
    ({"floor": 0.0}, "floor"),
])
def test_bad_settings_name_themselves(bad: dict, message: str) -> None:
    reference, pairs, rest, kinds = _triatomic()
    settings = {"pairs": pairs, "initial_rate": 0.1, "floor": 0.02, **bad}
    with pytest.raises(ValueError, match=message):
        RestoringVelocity(reference, settings["pairs"], rest, torch.ones(3), kinds, scale=SCALE,
                          initial_rate=settings["initial_rate"], floor=settings["floor"])
