"""Threshold refinement against an exact tail-mass oracle (the Gaussian case of DESIGN §5)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import integrate, optimize, stats

from tfft.refine import Bracket, next_threshold, update_bracket

ALPHA, GAMMA = 0.1, 1.0


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


def refine(eta0: float, side: str, rounds: int, step: float = 1.0):
    bracket, eta, history = Bracket(), eta0, []
    for k in range(rounds):
        m = tail_mass(eta, side)
        history.append((eta, m))
        bracket = update_bracket(bracket, eta, m, alpha=ALPHA, side=side)
        open_side = not (math.isfinite(bracket.lo) and math.isfinite(bracket.hi))
        eta = next_threshold(bracket, alpha=ALPHA, step=step * (2**k if open_side else 1))
    return eta, history


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
    final, history = refine(eta0, side, rounds=6)
    errors = [abs(e - truth) for e, _ in history] + [abs(final - truth)]
    assert errors[-1] < 2e-2 < 1.5 < errors[0]
    assert errors[-1] < errors[2] < errors[0]


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


def test_bad_inputs():
    with pytest.raises(ValueError, match="side"):
        update_bracket(Bracket(), 1.0, 0.5, alpha=0.1, side="up")
    with pytest.raises(ValueError, match="tail_mass"):
        update_bracket(Bracket(), 1.0, 1.5, alpha=0.1, side="right")
    with pytest.raises(ValueError, match="no measured end"):
        next_threshold(Bracket(), alpha=0.1, step=1.0)
