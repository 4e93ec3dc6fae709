"""Tail statistics and the threshold solver against closed forms, brute force and quadrature (DESIGN.md s. 3-5)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from scipy import integrate, optimize, special, stats

from tfft.tail import Threshold, cvar, solve_threshold, threshold_objective, var

SIDES = ("right", "left")


# ----------------------------------------------------------------------------------------------- CVaR and VaR
@pytest.mark.parametrize("alpha", [0.05, 0.1, 0.3, 1.0])
def test_cvar_uniform_closed_form(alpha: float) -> None:
    r = np.random.default_rng(0).uniform(size=200_000)
    assert cvar(r, side="right", alpha=alpha) == pytest.approx(1.0 - alpha / 2.0, abs=3e-3)
    assert cvar(r, side="left", alpha=alpha) == pytest.approx(alpha / 2.0, abs=3e-3)
    assert var(r, side="right", alpha=alpha) == pytest.approx(1.0 - alpha, abs=5e-3)
    assert var(r, side="left", alpha=alpha) == pytest.approx(alpha, abs=5e-3)


@pytest.mark.parametrize("alpha", [0.05, 0.2, 0.5])
def test_cvar_gaussian_closed_form(alpha: float) -> None:
    r = np.random.default_rng(1).standard_normal(200_000)
    z = stats.norm.isf(alpha)  # upper alpha-quantile
    expected = stats.norm.pdf(z) / alpha
    assert cvar(r, side="right", alpha=alpha) == pytest.approx(expected, abs=0.03)
    assert cvar(r, side="left", alpha=alpha) == pytest.approx(-expected, abs=0.03)
    assert var(r, side="right", alpha=alpha) == pytest.approx(z, abs=0.03)


@pytest.mark.parametrize(
    ("alpha", "right", "left", "var_right", "var_left"),
    [
        (0.25, (10 + 9 + 0.5 * 8) / 2.5, (1 + 2 + 0.5 * 3) / 2.5, 8.0, 3.0),
        (0.2, 9.5, 1.5, 9.0, 2.0),
        (0.33, (10 + 9 + 8 + 0.3 * 7) / 3.3, (1 + 2 + 3 + 0.3 * 4) / 3.3, 7.0, 4.0),
        (0.7, (10 + 9 + 8 + 7 + 6 + 5 + 4) / 7, (1 + 2 + 3 + 4 + 5 + 6 + 7) / 7, 4.0, 7.0),
        (1.0, 5.5, 5.5, 1.0, 10.0),
    ],
)
def test_cvar_fractional_boundary_by_hand(
    alpha: float, right: float, left: float, var_right: float, var_left: float
) -> None:
    r = np.arange(1.0, 11.0)
    np.random.default_rng(2).shuffle(r)
    assert cvar(r, side="right", alpha=alpha) == pytest.approx(right, abs=1e-12)
    assert cvar(r, side="left", alpha=alpha) == pytest.approx(left, abs=1e-12)
    assert var(r, side="right", alpha=alpha) == var_right
    assert var(r, side="left", alpha=alpha) == var_left


def test_tail_mass_exactly_at_alpha_despite_rounding() -> None:
    """0.07 * 100 rounds to 7.000000000000001: the tail is still exactly the best (worst) 7 samples."""
    r = np.arange(1.0, 101.0)
    assert var(r, side="right", alpha=0.07) == 94.0
    assert var(r, side="left", alpha=0.07) == 7.0
    assert cvar(r, side="right", alpha=0.07) == pytest.approx(97.0, abs=1e-12)
    assert var(r, side="right", alpha=0.55, weights=np.full(100, 0.1)) == 46.0


def test_cvar_ties_and_tiny_banks() -> None:
    for alpha in (0.01, 0.5, 1.0):
        assert cvar([0.3], side="right", alpha=alpha) == 0.3
        assert cvar([0.3], side="left", alpha=alpha) == 0.3
        assert var([0.3], side="left", alpha=alpha) == 0.3
        assert cvar([2.0] * 7, side="right", alpha=alpha) == pytest.approx(2.0, abs=1e-15)
    assert cvar([0.0, 1.0, 1.0, 0.0], side="right", alpha=0.75) == pytest.approx(2.0 / 3.0, abs=1e-15)
    assert cvar([0.0, 1.0, 1.0, 0.0], side="left", alpha=0.75) == pytest.approx(1.0 / 3.0, abs=1e-15)
    assert cvar([0.0, 1.0], side="right", alpha=0.6) == pytest.approx(0.5 / 0.6, abs=1e-15)


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("alpha", [0.03, 0.37, 1.0])
def test_cvar_matches_its_dual_at_the_var(side: str, alpha: float) -> None:
    """CVaR+ = VaR + E[(r - VaR)_+]/alpha, CVaR- = VaR - E[(VaR - r)_+]/alpha (weighted too)."""
    rng = np.random.default_rng(3)
    r, w = rng.standard_t(3, size=501), rng.exponential(size=501)
    p = w / w.sum()
    level = var(r, side=side, alpha=alpha, weights=w)

    def dual(eta: float) -> float:
        if side == "right":
            return eta + p @ np.maximum(r - eta, 0) / alpha
        return eta - p @ np.maximum(eta - r, 0) / alpha

    assert cvar(r, side=side, alpha=alpha, weights=w) == pytest.approx(dual(level), rel=1e-10, abs=1e-12)
    # the dual is optimised at the VaR: no other eta does better
    others = np.array([dual(eta) for eta in np.concatenate([r, level + rng.normal(size=20)])])
    assert np.all(others >= dual(level) - 1e-12) if side == "right" else np.all(others <= dual(level) + 1e-12)


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("alpha", [0.1, 0.25, 0.6, 1.0])
def test_weighted_cvar_equals_repeated_samples(side: str, alpha: float) -> None:
    rng = np.random.default_rng(4)
    r = np.round(rng.normal(size=40), 1)  # ties
    counts = rng.integers(0, 5, size=40)
    counts[0] = max(counts[0], 1)
    repeated = np.repeat(r, counts)
    assert cvar(r, side=side, alpha=alpha, weights=counts) == pytest.approx(
        cvar(repeated, side=side, alpha=alpha), rel=1e-12, abs=1e-12
    )
    assert var(r, side=side, alpha=alpha, weights=counts) == var(repeated, side=side, alpha=alpha)


@pytest.mark.parametrize("side", SIDES)
def test_weighted_cvar_matches_resampling(side: str) -> None:
    rng = np.random.default_rng(5)
    r, w = rng.normal(size=30), rng.exponential(size=30)
    draws = r[rng.choice(r.size, size=400_000, p=w / w.sum())]
    for alpha in (0.1, 0.5):
        assert cvar(r, side=side, alpha=alpha, weights=w) == pytest.approx(
            cvar(draws, side=side, alpha=alpha), abs=0.02
        )


def test_input_types_and_mean() -> None:
    values = [3.0, -1.0, 2.5, 7.0, 0.0]
    expected = cvar(np.array(values), side="right", alpha=0.3)
    assert cvar(values, side="right", alpha=0.3) == expected
    assert cvar(torch.tensor(values, dtype=torch.float32), side="right", alpha=0.3) == pytest.approx(expected)
    assert isinstance(cvar(values, side="left", alpha=0.5), float)
    assert cvar(values, side="left", alpha=1.0, weights=[1, 0, 0, 0, 1]) == pytest.approx(1.5, abs=1e-15)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"side": "up", "alpha": 0.1}, "side"),
        ({"side": "right", "alpha": 0.0}, "alpha"),
        ({"side": "right", "alpha": 1.5}, "alpha"),
        ({"side": "right", "alpha": math.nan}, "alpha"),
        ({"side": "right", "alpha": 0.1, "weights": [1.0, 2.0]}, "weights"),
        ({"side": "right", "alpha": 0.1, "weights": [1.0, -1.0, 1.0]}, "weights"),
        ({"side": "right", "alpha": 0.1, "weights": [0.0, 0.0, 0.0]}, "weights"),
    ],
)
def test_cvar_validation(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        cvar([1.0, 2.0, 3.0], **kwargs)
    with pytest.raises(ValueError, match=name):
        var([1.0, 2.0, 3.0], **kwargs)


def test_cvar_rejects_empty_and_non_finite() -> None:
    for bad in ([], [1.0, math.nan], [math.inf, 1.0], [[1.0, 2.0]]):
        with pytest.raises(ValueError, match="rewards"):
            cvar(bad, side="right", alpha=0.5)


# ------------------------------------------------------------------------------------------- threshold problem
def objective_grid(etas: np.ndarray, r: np.ndarray, side: str, alpha: float, kl_weight: float) -> np.ndarray:
    """J(eta) of DESIGN.md section 3 for many eta at once, written independently of the library."""
    gap = r[None, :] - etas[:, None]
    exponent = np.maximum(gap, 0) if side == "right" else -np.maximum(-gap, 0)
    return etas + kl_weight * (special.logsumexp(exponent / (alpha * kl_weight), axis=1) - math.log(r.size))


def tilt(r: np.ndarray, eta: float, side: str, alpha: float, kl_weight: float) -> np.ndarray:
    g = np.maximum(r - eta, 0) / alpha if side == "right" else -np.maximum(eta - r, 0) / alpha
    return special.softmax(g / kl_weight)


BANKS = {
    "normal7": np.random.default_rng(10).normal(size=7),
    "normal40": np.random.default_rng(11).normal(scale=3.0, size=40),
    "ties": np.random.default_rng(12).integers(0, 4, size=25).astype(float),
    "heavy": np.random.default_rng(13).standard_t(2, size=30),
    "bimodal": np.concatenate([np.full(10, -2.0), np.full(3, 5.0), np.random.default_rng(14).normal(size=6)]),
    "constant": np.full(5, 2.0),
    "single": np.array([0.3]),
    "pair": np.array([0.0, 1.0]),
}


@pytest.mark.parametrize("bank", sorted(BANKS))
@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("alpha", [0.05, 0.3, 1.0])
@pytest.mark.parametrize("kl_weight", [0.1, 1.0, 10.0])
def test_solver_matches_brute_force(bank: str, side: str, alpha: float, kl_weight: float) -> None:
    r = BANKS[bank]
    result = solve_threshold(r, side=side, alpha=alpha, kl_weight=kl_weight)
    knots = np.unique(r)
    grid = np.linspace(r.min() - 2.0, r.max() + 2.0, 4001)
    etas = np.concatenate([grid, knots])
    values = objective_grid(etas, r, side, alpha, kl_weight)
    scale = 1e-10 * (1.0 + np.abs(values).max())
    independent = objective_grid(np.array([result.eta]), r, side, alpha, kl_weight)[0]
    assert result.value == pytest.approx(independent, abs=scale)
    assert result.value == pytest.approx(
        threshold_objective(result.eta, r, side=side, alpha=alpha, kl_weight=kl_weight), abs=scale
    )
    if side == "right":
        assert result.value <= values.min() + scale
        if alpha == 1.0:
            assert result.eta == r.min()
        else:
            # J_R is convex: its minimiser lies within one grid step of the best grid point; refine there.
            best = etas[np.argmin(values)]
            step = grid[1] - grid[0]
            refined = optimize.minimize_scalar(
                lambda eta: objective_grid(np.array([eta]), r, side, alpha, kl_weight)[0],
                bounds=(best - step, best + step), method="bounded", options={"xatol": 1e-10},
            )
            assert result.value <= refined.fun + scale
            assert result.eta == pytest.approx(refined.x, abs=1e-6 * (1 + abs(refined.x)))
    else:
        assert result.value >= values.max() - scale
        assert result.eta in knots
        if alpha == 1.0:
            assert result.eta == r.max()
    assert result.n_valid == r.size and result.n_invalid == 0
    assert 1.0 - 1e-9 <= result.ess <= r.size + 1e-9
    active = r > result.eta if side == "right" else r < result.eta
    assert result.active_fraction == np.mean(active)
    assert result.tail_mass == pytest.approx(tilt(r, result.eta, side, alpha, kl_weight)[active].sum(), abs=1e-12)


@pytest.mark.parametrize("kl_weight", [0.1, 1.0, 10.0])
def test_right_objective_is_convex(kl_weight: float) -> None:
    r = BANKS["heavy"]
    etas = np.linspace(r.min() - 1, r.max() + 1, 3001)
    values = np.array([threshold_objective(e, r, side="right", alpha=0.2, kl_weight=kl_weight) for e in etas])
    assert np.all(np.diff(values, 2) >= -1e-9 * (1 + np.abs(values).max()))


def test_left_objective_is_not_concave_but_solver_finds_global_max() -> None:
    r = BANKS["bimodal"]
    etas = np.linspace(r.min() - 1, r.max() + 1, 3001)
    values = objective_grid(etas, r, "left", 0.3, 1.0)
    assert np.any(np.diff(values, 2) > 1e-6)  # a convex kink: gradient ascent could stall
    result = solve_threshold(r, side="left", alpha=0.3, kl_weight=1.0)
    assert result.value >= values.max() - 1e-12


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize(("alpha", "kl_weight"), [(0.1, 3.0), (0.05, 1.0), (0.3, 0.5), (0.5, 10.0)])
def test_stationarity_tail_mass_equals_alpha(side: str, alpha: float, kl_weight: float) -> None:
    r = np.random.default_rng(20).standard_normal(50_000)
    result = solve_threshold(r, side=side, alpha=alpha, kl_weight=kl_weight)
    w = tilt(r, result.eta, side, alpha, kl_weight)
    strict = r > result.eta if side == "right" else r < result.eta
    # sub-gradient optimality condition: P(strictly beyond) <= alpha <= P(beyond or at eta*)
    assert w[strict].sum() <= alpha + 1e-9
    assert w[strict | (r == result.eta)].sum() >= alpha - 1e-9
    assert result.tail_mass == pytest.approx(alpha, abs=2e-3)


@pytest.mark.parametrize("side", SIDES)
def test_alpha_one_is_expected_reward(side: str) -> None:
    r = np.random.default_rng(21).normal(size=300)
    kl_weight = 0.7
    result = solve_threshold(r, side=side, alpha=1.0, kl_weight=kl_weight)
    expected = kl_weight * (special.logsumexp(r / kl_weight) - math.log(r.size))
    assert result.value == pytest.approx(expected, rel=1e-12)
    weights = tilt(r, result.eta, side, 1.0, kl_weight)
    np.testing.assert_allclose(weights, special.softmax(r / kl_weight), rtol=1e-10)
    assert result.eta == (r.min() if side == "right" else r.max())
    assert result.tail_mass == pytest.approx(1.0 - weights[r == result.eta].sum(), abs=1e-12)


def _gaussian_eta_by_quadrature(alpha: float, kl_weight: float) -> float:
    """argmin J_R for r = x, x ~ N(0, 1), with E_q by scipy quadrature (DESIGN.md section 5)."""
    c = 1.0 / (alpha * kl_weight)

    def objective(eta: float) -> float:
        # E exp(c (x - eta)_+) = Phi(eta) + int_eta^inf phi(x) exp(c (x - eta)) dx; the integrand peaks at x = c.
        upper = max(eta, c) + 12.0
        points = [c] if eta < c < upper else None
        tail, _ = integrate.quad(lambda x: math.exp(c * (x - eta) - 0.5 * x * x) / math.sqrt(2 * math.pi),
                                 eta, upper, points=points, epsabs=0.0, epsrel=1e-12, limit=200)
        return eta + kl_weight * math.log(stats.norm.cdf(eta) + tail)

    return optimize.minimize_scalar(objective, bounds=(0.0, 8.0), method="bounded", options={"xatol": 1e-8}).x


def test_gaussian_threshold_against_quadrature() -> None:
    r = np.random.default_rng(3).standard_normal(100_000)
    exact = _gaussian_eta_by_quadrature(0.1, 3.0)
    assert exact == pytest.approx(2.28, abs=0.01)
    assert solve_threshold(r, side="right", alpha=0.1, kl_weight=3.0).eta == pytest.approx(exact, abs=0.1)
    # kl_weight = 1: the target lies mostly beyond every bank sample; the bank cannot see it and the ESS says so.
    exact_strong = _gaussian_eta_by_quadrature(0.1, 1.0)
    assert exact_strong == pytest.approx(5.22, abs=0.01)
    strong = solve_threshold(r, side="right", alpha=0.1, kl_weight=1.0)
    assert strong.eta < exact_strong - 1.0
    assert strong.ess < 1000


@pytest.mark.parametrize("side", SIDES)
def test_log_domain_stability(side: str) -> None:
    r = np.random.default_rng(22).uniform(0.0, 1e4, size=1000)
    result = solve_threshold(r, side=side, alpha=0.01, kl_weight=0.01)  # alpha * kl_weight = 1e-4
    assert all(math.isfinite(v) for v in result.to_dict().values())
    assert r.min() <= result.eta <= r.max()
    knots = np.sort(r)
    at_knots = objective_grid(knots, r, side, 0.01, 0.01)
    assert np.all(np.isfinite(at_knots))
    if side == "right":
        assert result.value <= at_knots.min() + 1e-6
    else:
        assert result.value >= at_knots.max() - 1e-6
    assert math.isfinite(threshold_objective(1e4, r, side=side, alpha=1e-2, kl_weight=1e-2))


def test_invalid_samples_excluded_and_counted() -> None:
    r = np.random.default_rng(23).normal(size=50)
    dirty = np.concatenate([r, [math.nan, math.inf, -math.inf, 100.0, -100.0]])
    valid = np.concatenate([np.ones(53, bool), [False, False]])
    clean = solve_threshold(r, side="right", alpha=0.2, kl_weight=0.5)
    result = solve_threshold(torch.tensor(dirty), side="right", alpha=0.2, kl_weight=0.5, valid=valid.tolist())
    assert result == dataclasses.replace(clean, n_invalid=5)
    with pytest.raises(ValueError, match="rewards"):
        solve_threshold([math.nan, math.nan], side="left", alpha=0.2, kl_weight=1.0)
    with pytest.raises(ValueError, match="rewards"):
        solve_threshold([1.0, 2.0], side="left", alpha=0.2, kl_weight=1.0, valid=[False, False])
    with pytest.raises(ValueError, match="valid"):
        solve_threshold([1.0, 2.0], side="left", alpha=0.2, kl_weight=1.0, valid=[True])


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"side": "upper", "alpha": 0.1, "kl_weight": 1.0}, "side"),
        ({"side": "right", "alpha": 0.0, "kl_weight": 1.0}, "alpha"),
        ({"side": "left", "alpha": 2.0, "kl_weight": 1.0}, "alpha"),
        ({"side": "right", "alpha": 0.1, "kl_weight": 0.0}, "kl_weight"),
        ({"side": "right", "alpha": 0.1, "kl_weight": -1.0}, "kl_weight"),
        ({"side": "right", "alpha": 0.1, "kl_weight": math.inf}, "kl_weight"),
    ],
)
def test_threshold_validation(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        solve_threshold([1.0, 2.0], **kwargs)
    with pytest.raises(ValueError, match=name):
        threshold_objective(1.0, [1.0, 2.0], **kwargs)
    with pytest.raises(ValueError, match="rewards"):
        solve_threshold([], **{**kwargs, "side": "right", "alpha": 0.5, "kl_weight": 1.0})


def test_threshold_result_bundle() -> None:
    result = solve_threshold([0.0, 1.0, 2.0], side="right", alpha=0.5, kl_weight=1.0)
    assert isinstance(result, Threshold)
    headline = result.to_dict()
    assert list(headline) == ["eta", "value", "tail_mass", "ess", "active_fraction"]
    assert all(type(v) is float for v in headline.values())
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.eta = 0.0  # type: ignore[misc]
