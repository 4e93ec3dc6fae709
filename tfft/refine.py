"""Threshold refinement from the fine-tuned model's own tail mass (DESIGN §5).

A finite base bank cannot see a strongly tilted target, so its eta* can be far off. But
J_R'(eta) = 1 - P_{p_eta}(r > eta) / alpha, and a model fine-tuned at eta samples p_eta: its measured tail
mass m(eta) says on which side eta* lies (right: m > alpha -> eta* > eta). Left side: J_L'(eta) =
1 - P_{p_eta}(r < eta) / alpha, so m > alpha -> eta* < eta. The root m(eta*) = alpha is bracketed and found
with a safeguarded secant on log m (log m is close to linear in eta in the tilted regime), falling back
to bisection; an optional proposal (e.g. the alpha-VaR of the model's samples, which equals eta at the
fixed point) is used while it lies strictly inside the bracket.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["RefineRound", "Bracket", "update_bracket", "next_threshold"]


@dataclass(frozen=True)
class RefineRound:
    """One refinement round: the threshold used, the tail mass measured beyond it, the bracket after it."""

    round: int
    eta: float
    tail_mass: float
    lo: float
    hi: float


@dataclass(frozen=True)
class Bracket:
    """eta* lies in (lo, hi); ``m_lo``/``m_hi`` are the tail masses measured at the ends (NaN if open)."""

    lo: float = -math.inf
    hi: float = math.inf
    m_lo: float = math.nan
    m_hi: float = math.nan


def update_bracket(bracket: Bracket, eta: float, tail_mass: float, *, alpha: float, side: str) -> Bracket:
    """Shrink the bracket with a measurement m(eta) (right: m decreasing in eta; left: increasing)."""
    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' or 'left', got {side!r}")
    if not 0.0 <= tail_mass <= 1.0:
        raise ValueError(f"tail_mass must be in [0, 1], got {tail_mass}")
    eta_is_low = (tail_mass > alpha) if side == "right" else (tail_mass < alpha)
    if eta_is_low and eta > bracket.lo:
        return Bracket(eta, bracket.hi, tail_mass, bracket.m_hi)
    if not eta_is_low and eta < bracket.hi:
        return Bracket(bracket.lo, eta, bracket.m_lo, tail_mass)
    return bracket


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
    """The next threshold to try.

    Args:
        bracket: after :func:`update_bracket` with every measurement so far.
        step: distance to move from the measured end while the bracket is open on one side (the caller
            doubles it each round the bracket stays open).
        proposal: a candidate (e.g. the model's alpha-VaR), used when strictly inside the bracket.
        floor: tail masses are clipped to [floor, 1 - floor] before taking log-odds (zero counts).
        tol: an end whose log-odds are within ``tol`` of logit(alpha) is returned as converged.

    With both ends measured, a secant step on logit(m) - logit(alpha): for a tilted tail the log-odds
    of the tail mass are close to linear in eta, so this is nearly exact; the step is kept inside the middle
    80% of the bracket.
    """
    lo, hi = bracket.lo, bracket.hi
    if not (math.isfinite(lo) or math.isfinite(hi)):
        raise ValueError("the bracket has no measured end; call update_bracket first")
    if proposal is not None and math.isfinite(proposal) and lo < proposal < hi:
        if math.isfinite(lo) and math.isfinite(hi):
            margin = 0.05 * (hi - lo)
            return min(max(proposal, lo + margin), hi - margin)
        return proposal
    if not math.isfinite(lo):
        return hi - step
    if not math.isfinite(hi):
        return lo + step
    f_lo = _logit(bracket.m_lo, floor) - _logit(alpha, floor)
    f_hi = _logit(bracket.m_hi, floor) - _logit(alpha, floor)
    if abs(f_lo) <= tol or abs(f_hi) <= tol:  # an end already has the tail mass alpha
        return lo if abs(f_lo) <= abs(f_hi) else hi
    margin = 0.1 * (hi - lo)  # keeps both ends moving (plain regula falsi can stall on one side)
    guess = lo - f_lo * (hi - lo) / (f_hi - f_lo) if f_lo != f_hi else 0.5 * (lo + hi)
    return min(max(guess, lo + margin), hi - margin)
