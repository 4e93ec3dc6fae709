"""Threshold refinement (tfft.refine) against exact tail-mass oracles.

Gaussian case of DESIGN §5: r = x, x ~ N(0, 1), alpha 0.1, gamma 1, where the tilted tail mass has a closed form.
Two-mode case of the left-side issue: a deterministic bank whose J_L has two local maxima, with the oracle the
exact tilted tail mass under the bank's own law (what a perfectly fine-tuned model at eta would report).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import integrate, optimize, stats

from tfft.basin import left_basin, left_objective_at_knots
from tfft.bracket import Bracket, TailMeasurement, next_threshold, standard_error, tail_direction, update_bracket
from tfft.refine import refine_threshold
from tfft.tail import solve_threshold, threshold_objective, var

ALPHA, GAMMA = 0.1, 1.0
EXACT = 10**12  # sample count of an exact oracle: SE ~ 3e-7, the noise rule never fires far from the root


def tail_mass(eta: float, side: str = "right") -> float:
    """P_{p_eta}(r beyond eta) for r = x, x ~ N(0, 1), p_eta ∝ q exp(g_eta / gamma), in closed form."""
    c = 1.0 / (ALPHA * GAMMA)
    if side == "right":  # beyond: ∫_eta^inf phi(x) e^{c(x - eta)} = e^{c^2/2 - c eta} (1 - Phi(eta - c))
        log_a = c * c / 2 - c * eta + stats.norm.logsf(eta - c)
        log_b = stats.norm.logcdf(eta)
    else:  # below: ∫_-inf^eta phi(x) e^{-c(eta - x)} = e^{c^2/2 - c eta} Phi(eta - c)
        log_a = c * c / 2 - c * eta + stats.norm.logcdf(eta - c)
        log_b = stats.norm.logsf(eta)
    return 1.0 / (1.0 + math.exp(log_b - log_a))


def true_eta(side: str) -> float:
    return optimize.brentq(lambda e: tail_mass(e, side) - ALPHA, -20, 20)


def gaussian_oracle(side: str):
    return lambda eta: TailMeasurement(tail_mass(eta, side), EXACT)


def test_oracle_matches_quadrature_and_design_number():
    eta = 4.0
    c = 1 / (ALPHA * GAMMA)
    a = integrate.quad(lambda x: stats.norm.pdf(x) * math.exp(c * (x - eta)), eta, 60)[0]
    b = stats.norm.cdf(eta)
    assert tail_mass(eta) == pytest.approx(a / (a + b), rel=1e-6)
    assert true_eta("right") == pytest.approx(5.22, abs=0.01)  # DESIGN §5


@pytest.mark.parametrize("side, eta0", [("right", 3.36), ("right", 8.0), ("left", -1.6), ("left", 2.4)])
def test_refinement_converges_from_the_bank_estimate(side, eta0):
    """From the finite bank's 3.36 (truth 5.22), the error shrinks; 6 rounds reach 2e-2."""
    truth = true_eta(side)
    result = refine_threshold(gaussian_oracle(side), eta0=eta0, side=side, alpha=ALPHA, rounds=6, step=1.0)
    errors = [abs(r.eta - truth) for r in result.rounds] + [abs(result.eta - truth)]
    assert errors[-1] < 2e-2 < 1.5 < errors[0]
    assert errors[-1] < errors[2] < errors[0]
    assert [r.round for r in result.rounds] == [1, 2, 3, 4, 5, 6]
    assert all(r.next_eta == nxt.eta for r, nxt in zip(result.rounds, result.rounds[1:]))
    assert result.rounds[-1].next_eta == result.eta
    assert result.bracket.lo < truth < result.bracket.hi
    assert result.basin is None and result.warnings == ()


def test_a_unimodal_left_bank_gives_an_open_basin_and_the_same_refinement():
    """On N(0, 1) J_L has one maximum: the basin is the whole line, refinement is unchanged by the bank."""
    bank = stats.norm.ppf((np.arange(20_000) + 0.5) / 20_000)
    basin = left_basin(bank, alpha=ALPHA, kl_weight=GAMMA)
    assert (basin.lo, basin.hi, basin.rivals, basin.warnings) == (-math.inf, math.inf, (), ())
    assert basin.eta == solve_threshold(bank, side="left", alpha=ALPHA, kl_weight=GAMMA).eta
    kwargs = dict(eta0=basin.eta, side="left", alpha=ALPHA, rounds=6, step=1.0)
    with_bank = refine_threshold(gaussian_oracle("left"), bank_rewards=bank, kl_weight=GAMMA, **kwargs)
    without = refine_threshold(gaussian_oracle("left"), **kwargs)
    assert with_bank.rounds == without.rounds
    assert with_bank.eta == pytest.approx(true_eta("left"), abs=1e-3)


def test_bracket_never_loses_the_root():
    rng = np.random.default_rng(0)
    truth = true_eta("right")
    bracket = Bracket()
    for eta in rng.uniform(0, 10, size=30):
        bracket = update_bracket(bracket, float(eta), tail_mass(float(eta)), alpha=ALPHA, side="right")
        assert bracket.lo < truth < bracket.hi


def test_proposal_inside_bracket_is_used_and_outside_ignored():
    b = Bracket(4.0, 6.0, 0.9, 0.01)
    assert next_threshold(b, alpha=ALPHA, step=1.0, proposal=5.1) == pytest.approx(5.1)
    assert 4.0 < next_threshold(b, alpha=ALPHA, step=1.0, proposal=11.0) < 6.0
    assert next_threshold(Bracket(lo=4.0, m_lo=0.9), alpha=ALPHA, step=1.5) == pytest.approx(5.5)


def test_an_unmeasured_wall_is_approached_by_bisection():
    wall = Bracket(lo=4.0, hi=5.0, m_lo=0.9)  # hi is a bound on eta*, not a measurement
    assert next_threshold(wall, alpha=ALPHA, step=0.25) == pytest.approx(4.25)
    assert next_threshold(wall, alpha=ALPHA, step=3.0) == pytest.approx(4.5)
    assert next_threshold(Bracket(lo=1.0, hi=5.0, m_hi=0.01), alpha=ALPHA, step=8.0) == pytest.approx(3.0)


# --- noise -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("side, sign", [("right", 1), ("left", -1)])
def test_a_measurement_within_two_standard_errors_keeps_the_bracket(side, sign):
    n = 1000
    se = standard_error(ALPHA, n)
    assert se == pytest.approx(math.sqrt(0.1 * 0.9 / 1000))
    bracket = Bracket(4.0, 6.0, 0.5, 0.01)
    assert tail_direction(ALPHA + 1.9 * se, alpha=ALPHA, side=side, n=n) == 0
    assert update_bracket(bracket, 5.0, ALPHA + 1.9 * se, alpha=ALPHA, side=side, n=n) is bracket
    assert update_bracket(bracket, 5.0, ALPHA - 1.9 * se, alpha=ALPHA, side=side, n=n) is bracket
    above = update_bracket(bracket, 5.0, ALPHA + 2.1 * se, alpha=ALPHA, side=side, n=n)
    below = update_bracket(bracket, 5.0, ALPHA - 2.1 * se, alpha=ALPHA, side=side, n=n)
    # right: more mass than alpha beyond eta means eta* > eta; left: the opposite
    assert (above.lo, above.hi) == ((5.0, 6.0) if sign > 0 else (4.0, 5.0))
    assert (below.lo, below.hi) == ((4.0, 5.0) if sign > 0 else (5.0, 6.0))
    assert update_bracket(bracket, 5.0, ALPHA + 1.9 * se, alpha=ALPHA, side=side, n=n, z=1.0) is not bracket


def test_the_loop_keeps_eta_while_measurements_are_within_noise():
    n = 2000
    masses = iter([ALPHA + 1.5 * standard_error(ALPHA, n), ALPHA - 1.0 * standard_error(ALPHA, n), 0.5])
    result = refine_threshold(lambda eta: TailMeasurement(next(masses), n), eta0=3.0, side="right", alpha=ALPHA,
                              rounds=3, step=1.0)
    first, second, third = result.rounds
    assert (first.within_noise, first.updated, first.next_eta) == (True, False, 3.0)
    assert (second.within_noise, second.updated, second.next_eta) == (True, False, 3.0)
    assert (second.lo, second.hi) == (-math.inf, math.inf)
    assert (third.within_noise, third.updated, third.lo, third.next_eta) == (False, True, 3.0, 4.0)
    assert third.to_dict()["hi"] is None and first.to_dict()["proposal"] is None


def test_a_noisy_oracle_converges_and_keeps_the_root_only_with_the_noise_rule():
    """Binomial tail masses on n = 5000 samples: with the 2-SE rule the bracket always keeps eta* and the
    error ends within the noise band 2 SE / |m'(eta*)|; updating on every measurement (z = 0) loses the root."""
    truth, n = true_eta("right"), 5000
    slope = (tail_mass(truth + 1e-5) - tail_mass(truth - 1e-5)) / 2e-5
    band = 2 * standard_error(ALPHA, n) / abs(slope)
    assert slope == pytest.approx(-0.9, rel=1e-3) and band == pytest.approx(0.0094, abs=1e-4)
    lost = {}
    for z in (2.0, 0.0):
        lost[z] = 0
        for seed in range(20):
            rng = np.random.default_rng(seed)
            result = refine_threshold(
                lambda eta: TailMeasurement(rng.binomial(n, tail_mass(eta)) / n, n),
                eta0=3.36, side="right", alpha=ALPHA, rounds=12, step=1.0, z=z,
            )
            lost[z] += not result.bracket.lo < truth < result.bracket.hi
            if z == 2.0:
                assert abs(result.eta - truth) < band
                assert any(r.within_noise for r in result.rounds)
    assert lost[2.0] == 0 and lost[0.0] >= 10


# --- the left side: a two-mode bank --------------------------------------------------------------------------------

A2, G2 = 0.02, 100.0  # the alpha and gamma


def two_mode_bank(n: int = 2000) -> np.ndarray:
    """Quantile midpoints of 0.1 N(-10, 0.5^2) + 0.9 N(0, 0.5^2): a rare failure mode far below the main one."""
    n_low = n // 10
    low = -10.0 + 0.5 * stats.norm.ppf((np.arange(n_low) + 0.5) / n_low)
    high = 0.5 * stats.norm.ppf((np.arange(n - n_low) + 0.5) / (n - n_low))
    return np.concatenate([low, high])


def bank_oracle(bank: np.ndarray, *, proposal: bool):
    """P_{p_eta}(r < eta) under the bank's law tilted by w_i ∝ exp(-(eta - r_i)_+ / (alpha gamma)), exactly."""

    def measure(eta: float) -> TailMeasurement:
        log_w = -np.maximum(eta - bank, 0.0) / (A2 * G2)
        w = np.exp(log_w - log_w.max())
        w /= w.sum()
        var_eta = var(bank, side="left", alpha=A2, weights=w) if proposal else None
        return TailMeasurement(float(w[bank < eta].sum()), EXACT, var_eta)

    return measure


def j_left(eta: float, bank: np.ndarray) -> float:
    return threshold_objective(eta, bank, side="left", alpha=A2, kl_weight=G2)


def test_left_objective_at_knots_matches_brute_force():
    bank = np.concatenate([two_mode_bank(400), [0.0, 0.0, -10.0]])  # with ties
    knots, values = left_objective_at_knots(bank, alpha=A2, kl_weight=G2)
    np.testing.assert_array_equal(knots, np.unique(bank))
    np.testing.assert_allclose(values, [j_left(u, bank) for u in knots], rtol=0, atol=1e-10)
    best = solve_threshold(bank, side="left", alpha=A2, kl_weight=G2)
    assert knots[np.argmax(values)] == best.eta and values.max() == pytest.approx(best.value, abs=1e-10)


def test_two_mode_basin_rival_and_warning():
    """The bank's J_L: eta* -10.37 (J -10.667) in the low mode, a rival maximum at -1.02 (J -11.602) in the main
    mode, the valley between them at the low mode's largest reward; the rival is competitive at N = 2000."""
    bank = two_mode_bank()
    basin = left_basin(bank, alpha=A2, kl_weight=G2)
    best = solve_threshold(bank, side="left", alpha=A2, kl_weight=G2)
    assert (basin.eta, basin.value) == (best.eta, pytest.approx(best.value, abs=1e-10))
    assert (basin.eta, basin.value) == (pytest.approx(-10.374, abs=1e-3), pytest.approx(-10.667, abs=1e-3))
    assert basin.lo == -math.inf and basin.hi == bank[:200].max() == pytest.approx(-8.596, abs=1e-3)
    knots, values = left_objective_at_knots(bank, alpha=A2, kl_weight=G2)
    between = (knots > basin.eta) & (knots < -1.0)
    assert knots[between][np.argmin(values[between])] == basin.hi  # brute force: the valley
    (rival,) = basin.rivals
    main = knots > basin.hi
    assert rival.eta == knots[main][np.argmax(values[main])] == pytest.approx(-1.024, abs=1e-3)
    assert rival.value == pytest.approx(-11.602, abs=1e-3)
    assert basin.value - rival.value == pytest.approx(0.936, abs=1e-3)
    assert rival.gap_se == pytest.approx(0.719, abs=1e-3)  # 0.936 < 2 SE: a bank of 2000 cannot tell the modes
    (warning,) = basin.warnings
    assert "competitive local maximum at eta -1.024" in warning
    big = left_basin(two_mode_bank(20_000), alpha=A2, kl_weight=G2)  # SE / sqrt(10): no longer competitive
    assert big.rivals[0].gap_se == pytest.approx(rival.gap_se / math.sqrt(10), rel=0.02) and big.warnings == ()


def test_gap_standard_error_matches_resampled_banks():
    """The delta-method SE of J_L(eta*) - J_L(rival) against 400 i.i.d. banks of 2000 from the same mixture."""
    bank = two_mode_bank()
    basin = left_basin(bank, alpha=A2, kl_weight=G2)
    (rival,) = basin.rivals
    rng = np.random.default_rng(0)
    gaps = []
    for _ in range(400):
        low = rng.random(bank.size) < 0.1
        sample = np.where(low, rng.normal(-10.0, 0.5, bank.size), rng.normal(0.0, 0.5, bank.size))
        gaps.append(j_left(basin.eta, sample) - j_left(rival.eta, sample))
    assert np.std(gaps) == pytest.approx(rival.gap_se, rel=0.15)


@pytest.mark.parametrize("proposal", [True, False])
def test_two_mode_refinement_stays_in_the_bank_basin(proposal):
    """The issue: from the bank's eta* -10.37, a first step that crosses the valley (8, the distance between the
    modes) measures m < alpha on the main mode's rising flank, and plain bracketing settles on the main mode's
    crossing -1.02 with J -11.60. Inside the basin every step size ends at the bank's optimum."""
    bank = two_mode_bank()
    best = solve_threshold(bank, side="left", alpha=A2, kl_weight=G2)
    measure = bank_oracle(bank, proposal=proposal)
    kwargs = dict(eta0=best.eta, side="left", alpha=A2, rounds=10)
    old = refine_threshold(measure, step=8.0, **kwargs)
    assert old.eta == pytest.approx(-1.024, abs=5e-3) and j_left(old.eta, bank) == pytest.approx(-11.602, abs=1e-3)
    assert old.bracket.lo > -5.0  # the bank's optimum is out of the bracket for good
    for step in (1.0, 2.0, 4.0, 8.0, 16.0):
        new = refine_threshold(measure, step=step, bank_rewards=bank, kl_weight=G2, **kwargs)
        assert new.eta == pytest.approx(best.eta, abs=5e-3)
        assert j_left(new.eta, bank) == pytest.approx(best.value, abs=1e-3)
        assert all(r.hi <= new.basin.hi for r in new.rounds) and new.warnings == new.basin.warnings


def test_two_mode_bank_optimum_is_kept_within_noise():
    """On 5000 samples the bank's eta* measures 0.0196, within 2 SE (0.004) of alpha: nothing moves."""
    bank = two_mode_bank()
    best = solve_threshold(bank, side="left", alpha=A2, kl_weight=G2)
    exact = bank_oracle(bank, proposal=True)
    result = refine_threshold(
        lambda eta: TailMeasurement(exact(eta).tail_mass, 5000, exact(eta).proposal), eta0=best.eta,
        side="left", alpha=A2, rounds=3, step=8.0, bank_rewards=bank, kl_weight=G2,
    )
    assert result.rounds[0].tail_mass == pytest.approx(0.0196, abs=1e-4)
    assert all(r.within_noise for r in result.rounds) and result.eta == best.eta


# --- errors ----------------------------------------------------------------------------------------------------------


def test_bad_inputs():
    with pytest.raises(ValueError, match="side"):
        update_bracket(Bracket(), 1.0, 0.5, alpha=0.1, side="up")
    with pytest.raises(ValueError, match="tail_mass"):
        update_bracket(Bracket(), 1.0, 1.5, alpha=0.1, side="right")
    with pytest.raises(ValueError, match="no measured end"):
        next_threshold(Bracket(), alpha=0.1, step=1.0)
    with pytest.raises(ValueError, match="no measured end"):
        next_threshold(Bracket(-1.0, 1.0), alpha=0.1, step=1.0)  # walls only
    with pytest.raises(ValueError, match="lo < hi"):
        Bracket(2.0, 1.0)
    with pytest.raises(ValueError, match="n must be a positive integer"):
        TailMeasurement(0.1, 0)
    with pytest.raises(ValueError, match="tail_mass"):
        TailMeasurement(-0.1, 10)
    with pytest.raises(ValueError, match="proposal"):
        TailMeasurement(0.1, 10, math.nan)
    with pytest.raises(ValueError, match="NaN or inf"):
        left_basin([0.0, math.nan], alpha=0.1, kl_weight=1.0)


@pytest.mark.parametrize(
    "overrides, error, message",
    [
        (dict(alpha=1.0), ValueError, r"alpha must be a tail mass in \(0, 1\)"),
        (dict(side="up"), ValueError, "side"),
        (dict(rounds=-1), ValueError, "rounds must be a non-negative integer"),
        (dict(step=0.0), ValueError, "step must be finite and > 0"),
        (dict(eta0=math.inf), ValueError, "eta0 must be finite"),
        (dict(z=-1.0), ValueError, "z must be"),
        (dict(bank_rewards=[0.0, 1.0]), ValueError, "bank_rewards and kl_weight go together"),
        (dict(side="left", bank_rewards=two_mode_bank(), kl_weight=G2, alpha=A2, eta0=-1.0), ValueError,
         "outside the basin"),
        (dict(measure=lambda eta: 0.1), TypeError, "must return a TailMeasurement"),
    ],
)
def test_loop_bad_inputs(overrides, error, message):
    kwargs = dict(measure=gaussian_oracle("right"), eta0=3.0, side="right", alpha=ALPHA, rounds=2, step=1.0)
    kwargs.update(overrides)
    with pytest.raises(error, match=message):
        refine_threshold(kwargs.pop("measure"), **kwargs)
