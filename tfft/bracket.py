"""Bracketing the threshold's root m(eta*) = alpha from measured tail masses (DESIGN §3 and §5).

A model fine-tuned at eta samples p_eta ∝ q exp(g_eta / gamma); its tail mass m(eta) beyond eta is the derivative
of the dual, J'(eta) = 1 - m(eta) / alpha (right: m > alpha => eta* > eta; left: m < alpha => eta* > eta). A
measurement on n samples (:class:`TailMeasurement`) has the binomial standard error :func:`standard_error` at
the root; :func:`tail_direction` says which way the root lies, or that the measurement is within z standard
errors of alpha; :func:`update_bracket` moves one end of the bracket (lo, hi); :func:`next_threshold` proposes the
next eta with a safeguarded secant on the log-odds of m. The loop that drives them is `tfft.refine`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from tfft.tail import _check_side

__all__ = ["Bracket", "TailMeasurement", "next_threshold", "standard_error", "tail_direction", "update_bracket"]


# --- validation -------------------------------------------------------------------------------------------------


def _check_alpha(alpha: float) -> float:
    alpha = float(alpha)
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be a tail mass in (0, 1) for refinement, got {alpha}")
    return alpha


def _check_tail_mass(tail_mass: float) -> float:
    tail_mass = float(tail_mass)
    if not 0.0 <= tail_mass <= 1.0:
        raise ValueError(f"tail_mass must be in [0, 1], got {tail_mass}")
    return tail_mass


def _check_count(n: Any) -> int:
    if isinstance(n, bool) or not float(n).is_integer() or int(n) < 1:
        raise ValueError(f"n must be a positive integer sample count, got {n!r}")
    return int(n)


def _check_positive(value: float, name: str) -> float:
    value = float(value)
    if not (math.isfinite(value) and value > 0.0):
        raise ValueError(f"{name} must be finite and > 0, got {value}")
    return value


def _check_z(z: float) -> float:
    z = float(z)
    if not (math.isfinite(z) and z >= 0.0):
        raise ValueError(f"z must be finite and >= 0, got {z}")
    return z


def _bank(rewards: Any) -> np.ndarray:
    r = np.asarray(rewards, dtype=np.float64)
    if r.ndim != 1 or r.size == 0:
        raise ValueError(f"bank_rewards must be a non-empty 1-D array, got shape {r.shape}")
    if not np.all(np.isfinite(r)):
        raise ValueError("bank_rewards contains NaN or inf; pass the valid rewards only")
    return r


def _finite_or_none(value: float | None) -> float | None:
    """JSON has no infinity: open bracket ends and missing values become None."""
    return float(value) if value is not None and math.isfinite(value) else None


# --- one measurement ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TailMeasurement:
    """The tail mass m(eta) beyond eta measured on ``n`` samples of the model fine-tuned at eta.

    ``proposal`` is an optional next threshold, e.g. the alpha-VaR of the same samples (it equals eta at the
    fixed point m(eta) = alpha); :func:`next_threshold` uses it while it lies strictly inside the bracket.
    """

    tail_mass: float
    n: int
    proposal: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "tail_mass", _check_tail_mass(self.tail_mass))
        object.__setattr__(self, "n", _check_count(self.n))
        if self.proposal is not None:
            proposal = float(self.proposal)
            if not math.isfinite(proposal):
                raise ValueError(f"proposal must be finite or None, got {self.proposal}")
            object.__setattr__(self, "proposal", proposal)


def standard_error(alpha: float, n: int) -> float:
    """SE of a tail-mass estimate at the root: sqrt(alpha (1 - alpha) / n) (binomial, n samples)."""
    alpha, n = _check_alpha(alpha), _check_count(n)
    return math.sqrt(alpha * (1.0 - alpha) / n)


def tail_direction(tail_mass: float, *, alpha: float, side: str, n: int | None = None, z: float = 2.0) -> int:
    """Which way eta* lies from the eta at which ``tail_mass`` was measured.

    Returns +1 (eta* > eta), -1 (eta* < eta) or 0 when |m - alpha| <= z SE, SE = sqrt(alpha (1 - alpha) / n):
    the measurement cannot tell (``n=None`` is an exact measurement, SE = 0). Right: +1 iff m > alpha;
    left: +1 iff m < alpha (J_L'(eta) = 1 - m / alpha > 0).
    """
    side, alpha, z = _check_side(side), _check_alpha(alpha), _check_z(z)
    excess = _check_tail_mass(tail_mass) - alpha
    se = 0.0 if n is None else standard_error(alpha, n)
    if abs(excess) <= z * se:
        return 0
    above = 1 if excess > 0 else -1
    return above if side == "right" else -above


# --- the bracket --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bracket:
    """eta* lies in (lo, hi); ``m_lo``/``m_hi`` are the tail masses measured at the ends.

    An end with mass NaN is not a measurement: infinite, it is open; finite, it is a wall (a bound on eta* from
    elsewhere, e.g. the basin of :func:`left_basin`) that :func:`next_threshold` approaches by bisection.
    """

    lo: float = -math.inf
    hi: float = math.inf
    m_lo: float = math.nan
    m_hi: float = math.nan

    def __post_init__(self) -> None:
        if not self.lo < self.hi:
            raise ValueError(f"bracket needs lo < hi, got ({self.lo}, {self.hi})")

    @property
    def lo_measured(self) -> bool:
        return math.isfinite(self.lo) and not math.isnan(self.m_lo)

    @property
    def hi_measured(self) -> bool:
        return math.isfinite(self.hi) and not math.isnan(self.m_hi)

    @property
    def closed(self) -> bool:
        """Both ends measured: the secant step applies."""
        return self.lo_measured and self.hi_measured


def update_bracket(
    bracket: Bracket,
    eta: float,
    tail_mass: float,
    *,
    alpha: float,
    side: str,
    n: int | None = None,
    z: float = 2.0,
) -> Bracket:
    """The bracket after measuring m(eta) = ``tail_mass`` (on ``n`` samples; None: exact).

    The end on the side that :func:`tail_direction` rules out moves to eta. The bracket is returned unchanged
    when the measurement is within z SE of alpha (noise must not shrink it for good), or when eta is not
    strictly inside it (an end never moves outwards, and a contradicting measurement is not trusted).
    """
    direction = tail_direction(tail_mass, alpha=alpha, side=side, n=n, z=z)
    eta, tail_mass = float(eta), float(tail_mass)
    if direction == 0 or not bracket.lo < eta < bracket.hi:
        return bracket
    if direction > 0:
        return Bracket(eta, bracket.hi, tail_mass, bracket.m_hi)
    return Bracket(bracket.lo, eta, bracket.m_lo, tail_mass)


def _logit(m: float, floor: float) -> float:
    m = min(max(m, floor), 1.0 - floor)
    return math.log(m / (1.0 - m))


def next_threshold(
    bracket: Bracket,
    *,
    alpha: float,
    step: float,
    proposal: float | None = None,
    floor: float = 1e-6,
    tol: float = 1e-3,
) -> float:
    """The next threshold to try inside ``bracket`` (after :func:`update_bracket` with every measurement).

    In order of preference:

    1. ``proposal`` when strictly inside (lo, hi), kept in the middle 90% when both ends are finite;
    2. one measured end and an open other end: the measured end moved by ``step`` towards it (the caller
       grows ``step`` while the bracket stays open);
    3. one measured end and a wall: the same, but at most half-way to the wall (bisection);
    4. both ends measured: a secant step on f = logit(m) - logit(alpha), eta = lo - f_lo (hi - lo) / (f_hi - f_lo),
       kept in the middle 80% so both ends keep moving. For a tilted tail the log-odds of m are close to
       linear in eta, so this is nearly exact. An end with |f| <= ``tol`` is returned as converged.

    ``floor`` clips tail masses to [floor, 1 - floor] before the log-odds (zero counts; use 0.5 / n).
    """
    alpha, step = _check_alpha(alpha), _check_positive(step, "step")
    lo, hi = bracket.lo, bracket.hi
    if not (bracket.lo_measured or bracket.hi_measured):
        raise ValueError("the bracket has no measured end; call update_bracket with a measurement first")
    finite = math.isfinite(lo) and math.isfinite(hi)
    if proposal is not None and math.isfinite(proposal) and lo < proposal < hi:
        if finite:
            margin = 0.05 * (hi - lo)
            return min(max(proposal, lo + margin), hi - margin)
        return float(proposal)
    if not bracket.hi_measured:
        return min(lo + step, 0.5 * (lo + hi)) if math.isfinite(hi) else lo + step
    if not bracket.lo_measured:
        return max(hi - step, 0.5 * (lo + hi)) if math.isfinite(lo) else hi - step
    target = _logit(alpha, floor)
    f_lo, f_hi = _logit(bracket.m_lo, floor) - target, _logit(bracket.m_hi, floor) - target
    if abs(f_lo) <= tol or abs(f_hi) <= tol:
        return lo if abs(f_lo) <= abs(f_hi) else hi
    margin = 0.1 * (hi - lo)  # plain regula falsi can stall on one end
    guess = lo - f_lo * (hi - lo) / (f_hi - f_lo) if f_lo != f_hi else 0.5 * (lo + hi)
    return min(max(guess, lo + margin), hi - margin)
