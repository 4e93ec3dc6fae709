"""Pseudo-reward, target tilt and tail summaries (DESIGN.md sections 3-5)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy import integrate, optimize, special, stats

from tfft.tail import cvar, solve_threshold, var
from tfft.interval import TargetInterval, _resampled_statistics, batched_cvar, target_interval
from tfft.target import (
    TailSummary,
    effective_sample_size,
    pseudo_reward,
    pseudo_reward_grad_scale,
    summarize,
    target_summary,
    tilt_log_weights,
    tilt_weights,
)

SIDES = ("right", "left")


# ---------------------------------------------------------------------------------------------- pseudo-reward
def test_pseudo_reward_formulas() -> None:
    r = [-1.0, 0.5, 1.0, 2.0, 4.0]
    np.testing.assert_allclose(pseudo_reward(r, eta=1.0, side="right", alpha=0.25), [0, 0, 0, 4, 12])
    np.testing.assert_allclose(pseudo_reward(r, eta=1.0, side="left", alpha=0.5), [-4, -1, 0, 0, 0])
    np.testing.assert_array_equal(pseudo_reward(r, eta=None, side="left", alpha=0.5), r)
    np.testing.assert_array_equal(pseudo_reward_grad_scale(r, eta=1.0, side="right", alpha=0.25), [0, 0, 0, 4, 4])
    np.testing.assert_array_equal(pseudo_reward_grad_scale(r, eta=1.0, side="left", alpha=0.5), [2, 2, 0, 0, 0])
    np.testing.assert_array_equal(pseudo_reward_grad_scale(r, eta=None, side="right", alpha=0.5), np.ones(5))
    assert isinstance(pseudo_reward(np.array(r), eta=0.0, side="right", alpha=1.0), np.ndarray)


@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("eta", [0.0, None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torch_gradient_equals_grad_scale(side: str, eta: float | None, dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(0)
    r = torch.cat([torch.randn(64, generator=generator, dtype=dtype), torch.zeros(3, dtype=dtype)])  # ties at eta
    r.requires_grad_(True)
    g = pseudo_reward(r, eta=eta, side=side, alpha=0.2)
    assert isinstance(g, torch.Tensor) and g.dtype == dtype
    (grad,) = torch.autograd.grad(g.sum(), r)
    scale = pseudo_reward_grad_scale(r, eta=eta, side=side, alpha=0.2)
    assert isinstance(scale, torch.Tensor) and not scale.requires_grad
    torch.testing.assert_close(grad, scale)
    np.testing.assert_allclose(
        g.detach().numpy(), pseudo_reward(r.detach().numpy(), eta=eta, side=side, alpha=0.2), rtol=1e-6
    )
    np.testing.assert_array_equal(
        scale.numpy(), pseudo_reward_grad_scale(r.detach().numpy(), eta=eta, side=side, alpha=0.2)
    )


def test_pseudo_reward_validation() -> None:
    with pytest.raises(ValueError, match="side"):
        pseudo_reward([1.0], eta=0.0, side="both", alpha=0.1)
    with pytest.raises(ValueError, match="alpha"):
        pseudo_reward_grad_scale(torch.ones(2), eta=0.0, side="left", alpha=0.0)
    with pytest.raises(ValueError, match="kl_weight"):
        tilt_log_weights([1.0], eta=0.0, side="left", alpha=0.1, kl_weight=0.0)


# ----------------------------------------------------------------------------------------------------- tilt
@pytest.mark.parametrize("side", SIDES)
def test_tilt_weights_are_normalised_exp_of_pseudo_reward(side: str) -> None:
    r = np.random.default_rng(1).normal(size=100)
    log_w = tilt_log_weights(r, eta=0.3, side=side, alpha=0.2, kl_weight=2.0)
    np.testing.assert_allclose(log_w, pseudo_reward(r, eta=0.3, side=side, alpha=0.2) / 2.0)
    w = tilt_weights(torch.tensor(r), eta=0.3, side=side, alpha=0.2, kl_weight=2.0)
    np.testing.assert_allclose(w, np.exp(log_w) / np.exp(log_w).sum(), rtol=1e-12)


def test_tilt_weights_invalid_and_log_domain() -> None:
    r = np.array([1.0, math.nan, 1e4, 9e3, -1e4])
    w = tilt_weights(r, eta=0.0, side="right", alpha=1e-2, kl_weight=1e-2, valid=[1, 1, 1, 0, 1])
    assert np.all(np.isfinite(w)) and w.sum() == pytest.approx(1.0)
    assert w[1] == 0.0 and w[3] == 0.0 and w[2] == pytest.approx(1.0)
    left = tilt_weights(r, eta=1e4, side="left", alpha=1e-2, kl_weight=1e-2)
    assert left[2] == pytest.approx(1.0) and left[1] == 0.0
    with pytest.raises(ValueError, match="rewards"):
        tilt_weights([math.nan], eta=0.0, side="right", alpha=0.1, kl_weight=1.0)


@pytest.mark.parametrize("side", SIDES)
def test_alpha_one_target_is_expected_reward_tilt(side: str) -> None:
    r = np.random.default_rng(2).normal(scale=2.0, size=500)
    kl_weight = 0.8
    eta = solve_threshold(r, side=side, alpha=1.0, kl_weight=kl_weight).eta
    target = tilt_weights(r, eta=eta, side=side, alpha=1.0, kl_weight=kl_weight)
    expected_reward = tilt_weights(r, eta=None, side=side, alpha=1.0, kl_weight=kl_weight)
    np.testing.assert_allclose(target, expected_reward, rtol=1e-10)
    np.testing.assert_allclose(expected_reward, special.softmax(r / kl_weight), rtol=1e-10)


def test_effective_sample_size() -> None:
    assert effective_sample_size(np.full(17, 0.3)) == pytest.approx(17.0)
    assert effective_sample_size([0.0, 5.0, 0.0]) == pytest.approx(1.0)
    assert effective_sample_size(torch.tensor([1.0, 2.0, 3.0])) == pytest.approx(36.0 / 14.0)
    assert effective_sample_size([1e300, 2e300, 3e300]) == pytest.approx(36.0 / 14.0)
    for bad in ([], [1.0, -1.0], [0.0, 0.0], [math.nan]):
        with pytest.raises(ValueError, match="weights"):
            effective_sample_size(bad)


def test_threshold_ess_matches_tilt_weights() -> None:
    r = np.random.default_rng(3).normal(size=5000)
    result = solve_threshold(r, side="right", alpha=0.1, kl_weight=0.5)
    w = tilt_weights(r, eta=result.eta, side="right", alpha=0.1, kl_weight=0.5)
    assert result.ess == pytest.approx(effective_sample_size(w), rel=1e-9)
    assert result.tail_mass == pytest.approx(w[r > result.eta].sum(), rel=1e-9)


# -------------------------------------------------------------------------------------------------- summaries
def test_summarize_matches_tail_statistics_and_is_json_able() -> None:
    r = np.random.default_rng(4).normal(size=1000)
    dirty = np.concatenate([r, [math.nan, 50.0]])
    summary = summarize(dirty, valid=[True] * 1001 + [False])
    assert isinstance(summary, TailSummary)
    assert (summary.n, summary.n_valid) == (1002, 1000)
    assert summary.mean == pytest.approx(r.mean())
    assert list(summary.cvar_right) == ["0.05", "0.1", "0.2"]
    for level in (0.05, 0.1, 0.2):
        assert summary.cvar_right[f"{level:g}"] == cvar(r, side="right", alpha=level)
        assert summary.cvar_left[f"{level:g}"] == cvar(r, side="left", alpha=level)
    payload = summary.to_dict()
    assert list(payload) == ["n", "n_valid", "mean", "cvar_right", "cvar_left"]
    assert json.loads(json.dumps(payload)) == payload
    assert list(summarize(r, levels=(0.5, 1.0)).cvar_left) == ["0.5", "1"]


def test_summarize_weighted_and_degenerate() -> None:
    r = np.array([1.0, 2.0, 3.0, math.nan])
    summary = summarize(r, weights=[0.0, 1.0, 3.0, 7.0], levels=(0.5,))
    assert summary.mean == pytest.approx(2.75)
    assert summary.cvar_right["0.5"] == pytest.approx(3.0)
    assert summary.cvar_left["0.5"] == pytest.approx((0.25 * 2.0 + 0.25 * 3.0) / 0.5)
    failed = summarize([math.nan, math.inf], levels=(0.1,))
    assert (failed.n, failed.n_valid) == (2, 0) and math.isnan(failed.mean) and math.isnan(failed.cvar_left["0.1"])
    with pytest.raises(ValueError, match="weights"):
        summarize(r, weights=[0.0, 0.0, 0.0, 1.0])
    with pytest.raises(ValueError, match="weights"):
        summarize(r, weights=[1.0, 1.0])
    with pytest.raises(ValueError, match="alpha"):
        summarize(r, levels=(0.0,))


def test_target_summary_gaussian_closed_form() -> None:
    """Base N(0, 1), r = x, expected-reward tilt with kl_weight 2: the target is N(1/2, 1) (DESIGN.md s. 5)."""
    r = np.random.default_rng(5).standard_normal(200_000)
    summary = target_summary(r, eta=None, side="right", alpha=1.0, kl_weight=2.0, levels=(0.1, 0.2))
    assert summary.mean == pytest.approx(0.5, abs=0.02)
    for alpha in (0.1, 0.2):
        tail = stats.norm.pdf(stats.norm.isf(alpha)) / alpha
        assert summary.cvar_right[f"{alpha:g}"] == pytest.approx(0.5 + tail, abs=0.03)
        assert summary.cvar_left[f"{alpha:g}"] == pytest.approx(0.5 - tail, abs=0.03)


@pytest.mark.parametrize("side", SIDES)
def test_eta_is_the_var_of_the_target(side: str) -> None:
    """eta* is the alpha-VaR of the target p*, not of q (DESIGN.md section 3)."""
    r = np.random.default_rng(6).standard_normal(50_000)
    result = solve_threshold(r, side=side, alpha=0.1, kl_weight=3.0)
    w = tilt_weights(r, eta=result.eta, side=side, alpha=0.1, kl_weight=3.0)
    assert var(r, side=side, alpha=0.1, weights=w) == pytest.approx(result.eta, abs=0.02)
    assert abs(var(r, side=side, alpha=0.1) - result.eta) > 0.2
    summary = target_summary(r, eta=result.eta, side=side, alpha=0.1, kl_weight=3.0, levels=(0.1,))
    assert summary.mean == pytest.approx(float(w @ r))
    expected_cvar = cvar(r, side=side, alpha=0.1, weights=w)
    assert (summary.cvar_right if side == "right" else summary.cvar_left)["0.1"] == expected_cvar


# ------------------------------------------------------------------------------------------ bootstrap interval
@pytest.mark.parametrize("side", SIDES)
def test_batched_cvar_matches_scalar(side: str) -> None:
    rng = np.random.default_rng(7)
    r = np.round(rng.normal(size=300), 1)  # many ties
    weights = rng.random((6, 300)) * (rng.random((6, 300)) < 0.7)  # zero weights too
    weights[0] = 1.0
    for alpha in (0.01, 0.05, 0.1, 0.37, 1.0):
        expected = [cvar(r, side=side, alpha=alpha, weights=w) for w in weights]
        np.testing.assert_allclose(batched_cvar(r, weights, side=side, alpha=alpha), expected, rtol=1e-11, atol=1e-12)
    assert batched_cvar([2.0], [[0.5], [3.0]], side=side, alpha=0.1).tolist() == [2.0, 2.0]
    with pytest.raises(ValueError, match="weights"):
        batched_cvar(r, weights[0], side=side, alpha=0.1)
    with pytest.raises(ValueError, match="weights"):
        batched_cvar(r, np.zeros((2, 300)), side=side, alpha=0.1)


@pytest.mark.parametrize(("side", "eta"), [("right", 0.8), ("left", -0.5), ("right", None)])
def test_a_resample_is_the_target_summary_of_the_resampled_bank(side: str, eta: float | None) -> None:
    """Row b of the batched statistics equals target_summary of the bank drawn with multiplicities c_b."""
    rng = np.random.default_rng(8)
    r = np.sort(np.round(rng.normal(size=400), 2))
    objective = {"eta": eta, "side": side, "alpha": 0.2, "kl_weight": 0.7}
    counts = np.stack([np.bincount(rng.integers(0, r.size, r.size), minlength=r.size) for _ in range(4)])
    levels = (0.05, 0.1, 1.0)
    rows = _resampled_statistics(r, tilt_log_weights(r, **objective), counts, levels)
    for row, count in zip(rows, counts):
        expected = target_summary(np.repeat(r, count), levels=levels, **objective)
        flat = [expected.mean, *expected.cvar_right.values(), *expected.cvar_left.values()]
        np.testing.assert_allclose(row, flat, rtol=1e-10, atol=1e-12)


def _exact_gaussian_target(eta: float, alpha: float, kl_weight: float, level: float) -> tuple[float, float]:
    """(mean, right CVaR_level) of p ∝ phi(x) exp((x - eta)_+ / (alpha gamma)) with r = x, by quadrature."""
    c = 1.0 / (alpha * kl_weight)
    top = eta + c + 40.0  # the tilted part is phi(x - c) up to a constant: nothing left beyond c + 40

    def density(x: float) -> float:  # unnormalised, in the log domain to avoid overflow
        return math.exp(-0.5 * x * x + c * max(x - eta, 0.0))

    def integral(f, a: float, b: float) -> float:
        pieces = [(a, b)] if a >= eta or b <= eta else [(a, eta), (eta, b)]
        return sum(integrate.quad(f, lo, hi, limit=200)[0] for lo, hi in pieces)

    z = integral(density, -40.0, top)
    mean = integral(lambda x: x * density(x), -40.0, top) / z
    var_level = optimize.brentq(lambda t: integral(density, t, top) / z - level, -10.0, top)
    return mean, integral(lambda x: x * density(x), var_level, top) / z / level


def _interval_on_gaussian_bank(n: int, kl_weight: float, seed: int = 0) -> tuple[TargetInterval, float, float]:
    r = np.random.default_rng(seed).standard_normal(n)
    threshold = solve_threshold(r, side="right", alpha=0.1, kl_weight=kl_weight)
    interval = target_interval(r, eta=threshold.eta, side="right", alpha=0.1, kl_weight=kl_weight, seed=seed)
    return interval, threshold.eta, threshold.ess


def _width(interval: TargetInterval, stat: str) -> float:
    if stat == "mean":
        return interval.hi.mean - interval.lo.mean
    return interval.hi.cvar_right[stat] - interval.lo.cvar_right[stat]


def test_interval_covers_the_exact_gaussian_target_and_shrinks_like_root_n() -> None:
    """N(0, 1), r = x, right, alpha 0.1, gamma 10 (ESS ~ 0.93 N): the target at the bank's eta by quadrature."""
    interval, eta, ess = _interval_on_gaussian_bank(20_000, kl_weight=10.0)
    assert ess > 15_000
    exact_mean, exact_cvar = _exact_gaussian_target(eta, alpha=0.1, kl_weight=10.0, level=0.1)
    assert interval.lo.cvar_right["0.1"] <= exact_cvar <= interval.hi.cvar_right["0.1"]
    assert interval.lo.mean <= exact_mean <= interval.hi.mean
    # at this ESS the full-bank estimate sits inside its own interval and the bootstrap bias is small
    for lo, mid, hi in zip(*(_flat(s) for s in (interval.lo, interval.estimate, interval.hi))):
        assert lo <= mid <= hi
    assert abs(interval.bias.cvar_right["0.1"]) < 0.1 * _width(interval, "0.1")
    small, _, _ = _interval_on_gaussian_bank(5_000, kl_weight=10.0)
    for stat in ("mean", "0.1"):  # sqrt(20k / 5k) = 2
        assert 1.4 < _width(small, stat) / _width(interval, stat) < 3.0


def _flat(summary: TailSummary) -> list[float]:
    return [summary.mean, *summary.cvar_right.values(), *summary.cvar_left.values()]


def test_strong_tilt_gives_a_much_wider_interval_that_can_still_miss() -> None:
    moderate, _, ess_moderate = _interval_on_gaussian_bank(20_000, kl_weight=10.0)
    strong, eta, ess_strong = _interval_on_gaussian_bank(20_000, kl_weight=2.0)
    assert ess_strong < 0.05 * ess_moderate
    for stat in ("mean", "0.1"):
        assert _width(strong, stat) > 5.0 * _width(moderate, stat)
    # The limit the docstring states: the target's mass beyond the bank is invisible to every resample too.
    exact_mean, exact_cvar = _exact_gaussian_target(eta, alpha=0.1, kl_weight=2.0, level=0.1)
    assert strong.hi.cvar_right["0.1"] < exact_cvar and strong.hi.mean < exact_mean
    assert strong.bias.cvar_right["0.1"] < 0.0


def test_interval_layout_seed_and_valid_mask() -> None:
    r = np.random.default_rng(9).normal(size=2000)
    objective = {"eta": 1.0, "side": "left", "alpha": 0.2, "kl_weight": 2.0}
    interval = target_interval(r, n_boot=50, confidence=0.8, seed=3, levels=(0.1, 0.5, 0.1), **objective)
    payload = interval.to_dict()
    assert list(payload) == ["lo", "hi", "bias", "confidence", "n_boot"]
    assert (payload["confidence"], payload["n_boot"]) == (0.8, 50)
    for key in ("lo", "hi", "bias"):
        assert list(payload[key]) == ["mean", "cvar_right", "cvar_left"]
        assert list(payload[key]["cvar_left"]) == ["0.1", "0.5"]
    assert json.loads(json.dumps(payload)) == payload
    assert interval.estimate == target_summary(r, levels=(0.1, 0.5), **objective)
    assert all(lo <= hi for lo, hi in zip(_flat(interval.lo), _flat(interval.hi)))
    assert target_interval(r, n_boot=50, confidence=0.8, seed=3, levels=(0.1, 0.5), **objective) == interval
    assert target_interval(r, n_boot=50, seed=4, levels=(0.1,), **objective).lo.mean != interval.lo.mean
    dirty = np.concatenate([r, [math.nan, 1e6]])
    masked = target_interval(dirty, valid=[True] * 2001 + [False], n_boot=50, confidence=0.8, seed=3,
                             levels=(0.1, 0.5), **objective)
    assert masked.to_dict() == payload and (masked.lo.n, masked.lo.n_valid) == (2002, 2000)
    single = target_interval(r, n_boot=1, eta=None, side="right", alpha=1.0, kl_weight=1.0, levels=(0.1,))
    assert single.lo == single.hi


def test_interval_survives_weights_that_underflow_in_a_resample() -> None:
    """One sample carries ~1e6 nats more log weight than the rest: resamples without it still have mass."""
    r = np.array([0.0] * 9 + [1000.0])
    interval = target_interval(r, eta=None, side="right", alpha=1.0, kl_weight=1e-3, n_boot=200, levels=(0.5,))
    assert (interval.lo.mean, interval.hi.mean) == (0.0, 1000.0)  # P(a resample misses it) = 0.9^10 = 0.35
    assert interval.lo.cvar_left["0.5"] == 0.0 and np.isfinite(_flat(interval.bias)).all()


def test_interval_validation() -> None:
    r = np.random.default_rng(10).normal(size=100)
    objective = {"eta": 1.0, "side": "right", "alpha": 0.1, "kl_weight": 1.0}
    for bad in (0, -3, 2.5, True, math.nan, "200"):
        with pytest.raises(ValueError, match="n_boot"):
            target_interval(r, n_boot=bad, **objective)
    for bad in (0.0, 1.0, 1.5, -0.1, math.nan):
        with pytest.raises(ValueError, match="confidence"):
            target_interval(r, confidence=bad, **objective)
    with pytest.raises(ValueError, match="alpha"):
        target_interval(r, levels=(0.0,), **objective)
    with pytest.raises(ValueError, match="rewards"):
        target_interval([math.nan, 1.0], valid=[True, False], **objective)
