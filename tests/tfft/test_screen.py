"""Screened evaluation (`tfft.screen`) on the Gaussian closed-form task: fewer expensive calls, the same threshold."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from tfft.screen import placeholder_rewards, screened_evaluate, wilson_upper
from tfft.tail import solve_threshold
from tfft.target import summarize, tilt_weights


def _task(n: int, noise: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    r = rng.standard_normal(n)
    screen = r + noise * rng.standard_normal(n) if noise >= 0 else rng.standard_normal(n)  # < 0: uncorrelated
    calls = []

    def evaluate(idx):
        calls.append(idx.size)
        return r[idx]

    return r, screen, evaluate, calls


def test_wilson_upper_bound_matches_its_closed_form_and_covers():
    z = stats.norm.ppf(0.95)
    assert wilson_upper(0, 300) == pytest.approx(z * z / (300 + z * z))
    assert wilson_upper(0, 0) == 1.0 and wilson_upper(5, 5) == 1.0
    # coverage: the bound lies above the true p in about 95% of draws (Wilson is close to nominal)
    rng = np.random.default_rng(0)
    k = rng.binomial(400, 0.02, size=4000)
    covered = np.mean([wilson_upper(int(x), 400) >= 0.02 for x in k])
    assert 0.9 < covered < 0.99


@pytest.mark.parametrize("side", ["right", "left"])
def test_a_noisy_screen_gives_the_full_threshold_with_3x_fewer_calls(side):
    # N(0, 1) rewards, screen = reward + N(0, 0.3^2); alpha 0.1 and gamma 30: a tail of about a tenth of the bank
    n, alpha, gamma = 20_000, 0.1, 30.0
    r, screen, evaluate, calls = _task(n, noise=0.3)
    full = solve_threshold(r, side=side, alpha=alpha, kl_weight=gamma)
    got = screened_evaluate(screen, evaluate, side=side, alpha=alpha, kl_weight=gamma, audit=0.1, tolerance=0.05)
    assert not got.full and sum(calls) == got.expensive_calls <= n / 3
    assert got.skipped == n - got.expensive_calls and got.audited.sum() == 2000
    # the tail samples actually skipped: within the certified fraction of the tail
    beyond = (lambda x: x > full.eta) if side == "right" else (lambda x: x < full.eta)
    missed = int(beyond(r[~got.evaluated]).sum())
    assert missed <= 0.05 * beyond(r).sum()
    # the threshold and the target's tail statistic equal full evaluation's within their bootstrap spread
    rng = np.random.default_rng(5)
    key, level = f"cvar_{side}", "0.1"

    def target_cvar(values, eta):
        w = tilt_weights(values, eta=eta, side=side, alpha=alpha, kl_weight=gamma)
        return summarize(values, weights=w).to_dict()[key][level]

    boot = []
    for _ in range(20):
        sample = r[rng.integers(0, n, n)]
        eta = solve_threshold(sample, side=side, alpha=alpha, kl_weight=gamma).eta
        boot.append((eta, target_cvar(sample, eta)))
    eta_sd, cvar_sd = np.std(boot, axis=0)
    filled = placeholder_rewards(got.reward, got.evaluated, side)
    assert abs(got.eta - full.eta) <= 2 * eta_sd
    assert abs(target_cvar(filled, got.eta) - target_cvar(r, full.eta)) <= 2 * cvar_sd
    # and the closed form for scale: N(0, 1)'s 0.1-CVaR
    assert abs(summarize(r).to_dict()[key][level]) == pytest.approx(stats.norm.pdf(stats.norm.isf(0.1)) / 0.1, abs=0.05)


def test_an_uncorrelated_screen_is_caught_by_the_audit_and_falls_back_to_full_evaluation():
    n = 5_000
    r, screen, evaluate, calls = _task(n, noise=-1.0, seed=1)
    got = screened_evaluate(screen, evaluate, side="right", alpha=0.1, kl_weight=10.0, audit=0.1, tolerance=0.05)
    assert got.full and got.expensive_calls == n == sum(calls) and got.evaluated.all()
    assert got.eta == solve_threshold(r, side="right", alpha=0.1, kl_weight=10.0).eta


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="screen"):
        screened_evaluate(np.array([np.nan]), lambda i: i * 0.0, side="right", alpha=0.1, kl_weight=1.0)
    with pytest.raises(ValueError, match="side"):
        screened_evaluate(np.zeros(3), lambda i: i * 0.0, side="up", alpha=0.1, kl_weight=1.0)
    with pytest.raises(ValueError, match="finite rewards"):
        screened_evaluate(np.zeros(3), lambda i: np.full(i.size, np.nan), side="right", alpha=0.1, kl_weight=1.0)
    assert math.isfinite(wilson_upper(1, 10))
