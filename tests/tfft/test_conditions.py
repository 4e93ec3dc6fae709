"""Conditions through the library: samplers, trajectory subsets, lean adjoint, solvers and models.

Two checks throughout: a velocity that ignores its condition gives exactly the unconditional numbers, and with a
velocity that depends on the condition every row follows its own condition's flow (brute force: each row run
alone through an unconditional velocity of its condition).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from tfft.adjoint import lean_adjoint, select_time_steps
from tfft.matching import adjoint_matching_loss
from tfft.conditions import per_condition_weights, row_values, uniform_conditions
from tfft.model import GaussianVelocity, VelocityMLP, flow_matching_loss
from tfft.pseudo import pseudo_reward_signal
from tfft.sampling import sample_ode, sample_sde, time_grid
from tfft.solvers import AdjointMatchingConfig, AdjointMatchingSolver, WeightedFlowMatchingSolver
from tfft.user_model import FlatVelocity

MEANS = torch.tensor([[-1.0, 0.5], [1.0, -0.5], [0.0, 2.0]], dtype=torch.float64)


@pytest.fixture(autouse=True)
def _float64():
    """Exact comparisons in float64, restored afterwards (other modules' tests expect float32)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


class IgnoresCond(nn.Module):
    """A conditional interface around an unconditional velocity."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x, t, cond=None):
        return self.inner(x, t)


class PerCondition(nn.Module):
    """v(x, t, c) = the exact velocity of data N(MEANS[c], I) plus a shared trainable linear term."""

    def __init__(self) -> None:
        super().__init__()
        self.flows = nn.ModuleList([GaussianVelocity(m) for m in MEANS])
        self.lin = nn.Linear(2, 2)
        with torch.no_grad():
            self.lin.weight.mul_(0.1)
            self.lin.bias.mul_(0.1)

    def single(self, c: int):
        return lambda x, t: self.flows[c](x, t) + self.lin(x)

    def forward(self, x, t, cond):
        out = torch.empty_like(x)
        for c in range(len(self.flows)):
            rows = cond == c
            out[rows] = self.single(c)(x[rows], t[rows])
        return out


def _setup(n=12, steps=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, 2, generator=gen)
    noise = torch.randn(steps, n, 2, generator=gen)
    cond = uniform_conditions(n, 3, generator=gen)
    return x0, noise, cond


def test_velocity_that_ignores_cond_gives_the_unconditional_samplers_and_adjoint():
    base = VelocityMLP(2, hidden=16, depth=2)
    wrapped = IgnoresCond(base)
    x0, noise, cond = _setup()
    plain = sample_sde(base, x0, 8, noise=noise, return_trajectory=True)
    conditional = sample_sde(wrapped, x0, 8, noise=noise, return_trajectory=True, cond=cond)
    assert torch.equal(plain.xs, conditional.xs) and torch.equal(conditional.cond, cond)
    grid = time_grid(8)
    assert torch.equal(sample_ode(base, x0, grid), sample_ode(wrapped, x0, grid, cond))
    terminal = torch.randn(12, 2)
    a_plain, a_cond = lean_adjoint(base, plain, terminal), lean_adjoint(wrapped, conditional, terminal)
    assert torch.equal(a_plain.states, a_cond.states)
    steps = select_time_steps(8, n_early=3, generator=torch.Generator().manual_seed(1))
    l_plain = adjoint_matching_loss(base, plain, a_plain, steps).loss
    l_cond = adjoint_matching_loss(wrapped, conditional, a_cond, steps).loss
    assert torch.allclose(l_plain, l_cond, rtol=1e-12)


def test_rows_follow_their_own_condition_in_the_samplers_and_after_subset():
    model = PerCondition()
    x0, noise, cond = _setup()
    traj = sample_sde(model, x0, 8, noise=noise, return_trajectory=True, cond=cond)
    grid = time_grid(8)
    ode = sample_ode(model, x0, grid, cond)
    for i in range(12):
        c = int(cond[i])
        alone = sample_sde(model.single(c), x0[i:i + 1], 8, noise=noise[:, i:i + 1], return_trajectory=True)
        assert torch.allclose(traj.xs[:, i:i + 1], alone.xs, atol=1e-12)
        assert torch.allclose(ode[i:i + 1], sample_ode(model.single(c), x0[i:i + 1], grid), atol=1e-12)
    rows = torch.tensor([7, 2, 9])
    sub = traj.subset(rows)
    assert torch.equal(sub.cond, cond[rows])
    terminal = torch.randn(3, 2)
    adjoint = lean_adjoint(model, sub, terminal)
    for j, i in enumerate(rows.tolist()):
        one = dataclasses.replace(traj.subset(torch.tensor([i])), cond=None)  # an unconditional single row
        alone = lean_adjoint(model.single(int(cond[i])), one, terminal[j:j + 1])
        assert torch.allclose(adjoint.states[:, j:j + 1], alone.states, atol=1e-12)


def _signal(eta):
    def fn(x1, cond=None):
        r = x1[:, 0]
        e = eta if cond is None else row_values([eta, eta + 0.5, eta - 0.5], cond)
        return pseudo_reward_signal(r, torch.stack([torch.ones_like(r), torch.zeros_like(r)], 1),
                                    torch.ones_like(r, dtype=torch.bool), eta=e, side="right", alpha=0.3)
    return fn


def test_adjoint_solver_with_cond_equals_unconditional_when_ignored_and_brute_force_otherwise():
    torch.manual_seed(0)
    base = VelocityMLP(2, hidden=16, depth=2)
    model = VelocityMLP(2, hidden=16, depth=2)
    model.load_state_dict(base.state_dict())
    with torch.no_grad():
        model.net[-1].bias.add_(0.05)
    cfg = AdjointMatchingConfig(kl_weight=1.0, steps=8, n_early=3, clip_quantile=0.0)
    x0, _, cond = _setup(n=16)
    plain = AdjointMatchingSolver(model, base, _signal(0.0), cfg).step(x0, torch.Generator().manual_seed(3))
    solver = AdjointMatchingSolver(IgnoresCond(model), IgnoresCond(base), lambda x1, c: _signal(0.0)(x1), cfg)
    with_cond = solver.step(x0, torch.Generator().manual_seed(3), cond=cond)
    assert torch.allclose(plain.loss, with_cond.loss, rtol=1e-10)
    # a velocity and a threshold per condition: the fast path equals the reference path, and the per-row eta counts
    per = PerCondition()
    frozen = PerCondition()
    frozen.load_state_dict(per.state_dict())
    with torch.no_grad():
        per.lin.bias.add_(0.1)
    results = []
    for fast in (True, False):
        cfg_k = AdjointMatchingConfig(kl_weight=1.0, steps=8, n_early=3, clip_quantile=0.0, fast=fast)
        results.append(AdjointMatchingSolver(per, frozen, _signal(0.0), cfg_k).step(
            x0, torch.Generator().manual_seed(3), cond))
    assert torch.allclose(results[0].loss, results[1].loss, rtol=1e-10)
    # the pseudo-reward of each row uses its own condition's eta: E g by brute force on the same trajectories
    noise = torch.randn((8, 16, 2), generator=_after_steps(3))
    x1 = sample_sde(per, x0, 8, noise=noise, cond=cond)
    eta = torch.tensor([0.0, 0.5, -0.5])[cond]
    want = (torch.relu(x1[:, 0] - eta) / 0.3).mean()
    assert float(results[0].metrics["pseudo_reward"]) == pytest.approx(float(want), rel=1e-10)


def _after_steps(seed):
    """A generator in the state the solver leaves it after drawing its time steps (its first draw)."""
    gen = torch.Generator().manual_seed(seed)
    select_time_steps(8, n_early=3, generator=gen)
    return gen


def test_per_condition_weights_sum_to_one_over_c_each():
    w = np.array([1.0, 3.0, 2.0, 2.0, 5.0, 0.0])
    c = np.array([0, 0, 1, 1, 2, 2])
    out = per_condition_weights(w, c)
    for k in range(3):
        assert out[c == k].sum() == pytest.approx(1 / 3)
    assert out[0] / out[1] == pytest.approx(1 / 3)
    assert per_condition_weights([1.0, 1.0, 0.0], [0, 0, 1]).tolist() == [0.5, 0.5, 0.0]  # an empty condition
    assert row_values([1.0, 2.0], np.array([1, 0, 1])).tolist() == [2.0, 1.0, 2.0]
    assert row_values(0.5, np.array([1, 0])) == 0.5


def test_weighted_solver_with_cond():
    torch.manual_seed(0)
    bank = torch.randn(40, 2)
    weights = torch.rand(40)
    model = VelocityMLP(2, hidden=16, depth=2)
    zeros = torch.zeros(40, dtype=torch.long)
    for anchor in (False, True):
        base = VelocityMLP(2, hidden=16, depth=2) if anchor else None
        plain = WeightedFlowMatchingSolver(model, bank, weights, base=base)
        cond = WeightedFlowMatchingSolver(IgnoresCond(model), bank, weights, bank_cond=zeros,
                                          base=None if base is None else IgnoresCond(base))
        a = plain.step(8, torch.Generator().manual_seed(1), torch.Generator().manual_seed(2))
        b = cond.step(8, torch.Generator().manual_seed(1), torch.Generator().manual_seed(2))
        assert torch.allclose(a.loss, b.loss, rtol=1e-12)
    # two conditions: each condition's weights sum to 1/2, and the loss is the rows' own conditions' brute force
    per = PerCondition()
    bank_cond = torch.arange(40) % 2
    solver = WeightedFlowMatchingSolver(per, bank, weights, bank_cond=bank_cond)
    for k in (0, 1):
        assert float(solver.weights[bank_cond == k].sum()) == pytest.approx(0.5)
    got = solver.step(6, torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)).loss
    idx = torch.multinomial(solver.weights, 6, replacement=True, generator=torch.Generator().manual_seed(2))
    gen = torch.Generator().manual_seed(1)
    t = torch.rand(6, generator=gen)
    x0 = torch.randn(6, 2, generator=gen)
    x1 = bank[idx]
    x_t = t[:, None] * x1 + (1 - t[:, None]) * x0
    want = torch.stack([(per.single(int(bank_cond[i]))(x_t[j:j + 1], t[j:j + 1]) - (x1[j] - x0[j])).pow(2).sum()
                        for j, i in enumerate(idx.tolist())]).mean()
    assert torch.allclose(got, want, rtol=1e-10)
    assert torch.allclose(flow_matching_loss(per, x1, t=t, x0=x0, cond=bank_cond[idx]), want, rtol=1e-10)


def test_velocity_mlp_conditions():
    plain = VelocityMLP(2, hidden=8, depth=1)
    assert "num_conditions" not in plain.config and "condition_embedding.weight" not in plain.state_dict()
    model = VelocityMLP(2, hidden=8, depth=1, num_conditions=3)
    assert model.config["num_conditions"] == 3
    rebuilt = VelocityMLP(**model.config)
    rebuilt.load_state_dict(model.state_dict())
    x, t = torch.randn(4, 2), torch.rand(4)
    same = model(x, t, torch.zeros(4, dtype=torch.long))
    assert torch.allclose(same, model(x, t, torch.full((4,), 2)))  # zero-initialised embedding
    with torch.no_grad():
        model.condition_embedding.weight.normal_()
    assert not torch.allclose(model(x, t, torch.zeros(4, dtype=torch.long)), model(x, t, torch.full((4,), 2)))
    with pytest.raises(ValueError, match="pass cond"):
        model(x, t)
    with pytest.raises(ValueError, match="unconditional"):
        plain(x, t, torch.zeros(4, dtype=torch.long))


def test_flat_velocity_maps_indices_to_values():
    seen = []

    class Net(nn.Module):
        def forward(self, x, t, cond):
            seen.append(cond)
            return torch.zeros_like(x)

    flat = FlatVelocity(Net(), [2], conditions=["a", "b"])
    flat(torch.zeros(3, 2), torch.zeros(3), torch.tensor([1, 0, 1]))
    assert seen[-1] == ["b", "a", "b"]
    with pytest.raises(ValueError, match="conditional"):
        flat(torch.zeros(3, 2), torch.zeros(3))
    FlatVelocity(Net(), [2])(torch.zeros(3, 2), torch.zeros(3))
    assert seen[-1] is None
