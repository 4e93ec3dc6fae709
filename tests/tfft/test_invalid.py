"""The rule for failed samples (`tfft.invalid`) against closed forms on a uniform reward with failures."""

from __future__ import annotations

import numpy as np
import pytest

from tfft.invalid import assign_invalid, tail_both_ways, tilt_rewards
from tfft.tail import cvar, solve_threshold
from tfft.target import tilt_weights


def _bank(n: int, p: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """U(0, 1) rewards of which a fraction p failed (NaN, invalid)."""
    rng = np.random.default_rng(seed)
    r = rng.uniform(size=n)
    valid = rng.uniform(size=n) >= p
    return np.where(valid, r, np.nan), valid


def test_exclude_keeps_the_mask_and_assign_counts_every_sample():
    r, valid = _bank(1000, 0.2)
    kept, mask, rule = assign_invalid(r, valid, None)
    assert rule.rule == "exclude" and rule.value is None and np.array_equal(mask, valid)
    assert rule.n_invalid == int((~valid).sum()) and rule.invalid_fraction == pytest.approx((~valid).mean())
    filled, mask, rule = assign_invalid(r, valid, -3.0)
    assert rule.rule == "assign" and mask.all() and np.all(filled[~valid] == -3.0)
    assert np.array_equal(filled[valid], r[valid])
    with pytest.raises(ValueError, match="finite"):
        assign_invalid(r, valid, float("nan"))
    with pytest.raises(ValueError, match="same shape"):
        assign_invalid(r, valid[:-1], None)


@pytest.mark.parametrize("alpha", [0.1, 0.2])
def test_left_cvar_both_ways_matches_the_mixture_closed_form(alpha):
    # Failures of mass p at reward c below U(0, 1): the left CVaR(alpha > p) of the mixture is
    # (p c + (1 - p) q^2 / 2) / alpha with (1 - p) q = alpha - p; excluding failures gives alpha / 2.
    p, c = 0.05, -2.0
    r, valid = _bank(400_000, p, seed=1)
    ways = tail_both_ways(r, valid, c, levels=(alpha,))
    p = float((~valid).mean())  # the closed form at the drawn failure mass (its noise is amplified by c / alpha)
    q = (alpha - p) / (1 - p)
    assert ways.assigned[f"{alpha:g}"] == pytest.approx((p * c + (1 - p) * q * q / 2) / alpha, abs=4e-3)
    assert ways.excluded[f"{alpha:g}"] == pytest.approx(alpha / 2, abs=3e-3)
    assert ways.value_used == c and ways.invalid_fraction == pytest.approx(p, abs=2e-3)


def test_exclude_rule_compares_with_failures_at_the_worst_valid_reward():
    r, valid = _bank(20_000, 0.05, seed=2)
    ways = tail_both_ways(r, valid, None, levels=(0.1,))
    worst = float(np.nanmin(r))
    assert ways.value_used == worst
    brute = cvar(np.where(valid, r, worst), side="left", alpha=0.1)
    assert ways.assigned["0.1"] == pytest.approx(brute) and ways.assigned["0.1"] < ways.excluded["0.1"]
    assert tail_both_ways(r[valid], valid[valid], None) is None  # nothing failed: one way only


def test_a_penalty_moves_target_mass_out_of_the_failures():
    # Left side, failures of mass p at a penalty below every valid reward: the target tilt exp(g / gamma) gives
    # them less mass than the base (p), the less the smaller gamma; the threshold still has target tail mass alpha.
    p, c = 0.15, -1.0
    r, valid = _bank(50_000, p, seed=3)
    filled, mask, _ = assign_invalid(r, valid, c)
    masses = []
    for gamma in (4.0, 1.0, 0.25):
        th = solve_threshold(filled, side="left", alpha=0.1, kl_weight=gamma, valid=mask)
        w = tilt_weights(filled, eta=th.eta, side="left", alpha=0.1, kl_weight=gamma, valid=mask)
        assert th.tail_mass == pytest.approx(0.1, abs=5e-3)
        masses.append(float(w[~valid].sum()))
    assert float((~valid).mean()) > masses[0] > masses[1] > masses[2] > 0


def test_tilt_rewards_make_failures_neutral_unless_a_reward_is_assigned():
    # Under 'exclude' a failure takes eta, where g = 0 on either side: its tilt weight equals an untilted sample's.
    r, valid = _bank(2000, 0.1, seed=4)
    eta = 0.3
    filled, rows = tilt_rewards(r, valid, None, eta)
    assert rows.all() and np.all(filled[~valid] == eta) and np.array_equal(filled[valid], r[valid])
    w = tilt_weights(filled, eta=eta, side="left", alpha=0.1, kl_weight=1.0, valid=rows)
    untilted = w[valid & (r >= eta)]
    assert np.allclose(w[~valid], untilted[0]) and np.allclose(untilted, untilted[0])
    assert w[valid & (r < eta)].max() < untilted[0]
    penalised, rows = tilt_rewards(r, valid, -5.0, eta)
    assert rows.all() and np.all(penalised[~valid] == -5.0)
    mean_rows = tilt_rewards(r, valid, None, None)[1]  # the mean objective has no neutral reward
    assert np.array_equal(mean_rows, valid)
