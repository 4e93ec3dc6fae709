"""Threshold refinement from the fine-tuned model's own tail mass (DESIGN §3 and §5).

A finite base bank cannot see a strongly tilted target, so its eta* can be far off. A model fine-tuned at eta
samples p_eta ∝ q exp(g_eta / gamma), and its tail mass m(eta) beyond eta is the derivative of the dual:

    right:  J_R'(eta) = 1 - m(eta) / alpha,   m(eta) = P_{p_eta}(r > eta),   m > alpha  =>  eta* > eta
    left:   J_L'(eta) = 1 - m(eta) / alpha,   m(eta) = P_{p_eta}(r < eta),   m < alpha  =>  eta* > eta

(right: J_R is minimised; left: J_L is maximised). :func:`refine_threshold` brackets the root m(eta*) = alpha:
each round measures m at the current eta on n samples, moves one end of the bracket (lo, hi) to eta unless the
measurement is within z standard errors of alpha, SE = sqrt(alpha (1 - alpha) / n), and proposes the next eta
with a safeguarded secant on the log-odds of m (:func:`next_threshold`).

J_R is convex, so m is decreasing in eta and has one crossing. J_L is not concave: m is not monotone, and every
local maximum and minimum of J_L is a crossing. Bracketing alone can settle on any of them, so on the left side
the bracket starts as the basin of the bank's eta* on J_L (:func:`left_basin`): the interval around eta*
bounded by the nearest local minima of J_L on the bank's rewards. Refinement then moves eta* only within the
mode of the reward distribution that the bank chose.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from tfft.tail import _check_side

__all__ = [
    "Basin",
    "Bracket",
    "Peak",
    "RefineResult",
    "RefineRound",
    "TailMeasurement",
    "left_basin",
    "left_objective_at_knots",
    "next_threshold",
    "refine_threshold",
    "standard_error",
    "tail_direction",
    "update_bracket",
]



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


# --- the left side's basin ------------------------------------------------------------------------------------------


def left_objective_at_knots(rewards: Any, *, alpha: float, kl_weight: float) -> tuple[np.ndarray, np.ndarray]:
    """J_L on every sorted unique reward u_1 < ... < u_K of the bank, in O(N log N).

        J_L(u_j) = u_j + gamma log( (1/N) [ #{r >= u_j} + sum_{r < u_j} exp((r - u_j) / (alpha gamma)) ] ),

    the second sum from a prefix log-sum-exp (the rewards are shifted by max r first, J being translation-
    equivariant). J_L is convex between knots, so its global maximum over the bank is the largest of these.

    Returns:
        (knots, values), both shape (K,).
    """
    alpha, kl_weight = _check_alpha(alpha), _check_positive(kl_weight, "kl_weight")
    u, counts = np.unique(_bank(rewards), return_counts=True)
    scale, shift = alpha * kl_weight, float(u[-1])
    v = u - shift
    prefix = np.logaddexp.accumulate(np.log(counts) + v / scale)
    log_below = np.concatenate(([-np.inf], prefix[:-1]))  # log sum exp(v_r / scale) over r < u_j
    n_at_or_above = counts.sum() - np.cumsum(counts) + counts
    log_mean = np.logaddexp(np.log(n_at_or_above), log_below - v / scale) - math.log(counts.sum())
    return u, u + kl_weight * log_mean


@dataclass(frozen=True)
class Peak:
    """A local maximum of the bank's J_L outside the basin: its eta, J_L(eta), and the standard error of
    J_L(eta*) - J_L(eta) over banks of the same size (delta method, :func:`left_basin`)."""

    eta: float
    value: float
    gap_se: float


@dataclass(frozen=True)
class Basin:
    """The basin of the bank's eta* = argmax J_L: eta* and J_L(eta*), the nearest local minima of J_L on either
    side (lo, hi; infinite where J_L keeps falling to the end of the bank), the highest peak beyond each of them,
    and warnings about competitive rivals."""

    eta: float
    value: float
    lo: float
    hi: float
    rivals: tuple[Peak, ...] = ()
    warnings: tuple[str, ...] = ()


def _valley(values: np.ndarray, prominence: float) -> int | None:
    """Index of the first local minimum of ``values`` (ordered away from the peak at index 0) after which they
    rise by more than ``prominence``; None if they never do."""
    rise = values - np.minimum.accumulate(values)
    risen = np.flatnonzero(rise > prominence)
    if risen.size == 0:
        return None
    return int(np.argmin(values[: risen[0]]))


def _gap_se(r: np.ndarray, a: float, b: float, alpha: float, kl_weight: float) -> float:
    """SE of J_L(a) - J_L(b) estimated on the bank ``r`` (delta method):

        Var ≈ gamma^2 Var_q( e_a / E e_a - e_b / E e_b ) / N,   e_eta = exp(-(eta - r)_+ / (alpha gamma)).
    """
    scale = alpha * kl_weight
    e_a, e_b = np.exp(-np.maximum(a - r, 0.0) / scale), np.exp(-np.maximum(b - r, 0.0) / scale)
    return float(kl_weight * np.std(e_a / e_a.mean() - e_b / e_b.mean()) / math.sqrt(r.size))


def left_basin(
    rewards: Any, *, alpha: float, kl_weight: float, z: float = 2.0, prominence: float = 0.0
) -> Basin:
    """The basin of the bank's eta* on J_L, and the rival local maxima beyond it (DESIGN §3, left side).

    With J_j = J_L(u_j) on the sorted unique rewards (:func:`left_objective_at_knots`) and j* = argmax J_j,
    walk away from j* on each side; the bound is the knot of the running minimum at the first point where J
    has risen more than ``prominence`` above it (a neighbouring local minimum of J_L; the rise is a rival
    peak). Where J never rises again the basin is open (J_L = eta below min r and falls with slope 1 - 1/alpha
    above max r: no maximum lies beyond the bank).

    The highest knot beyond each bound is reported as a rival Peak; a rival with
    J_L(eta*) - J_L(rival) <= z SE (SE from :func:`_gap_se`) gives a warning: a fresh bank of the same size
    could put eta* in the rival's mode, so the refined threshold is only the optimum within the chosen mode.
    ``prominence`` (reward units, >= 0) ignores shallower dips; a floor of 1e-12 (1 + |J*|) absorbs rounding.
    """
    alpha, kl_weight, z = _check_alpha(alpha), _check_positive(kl_weight, "kl_weight"), _check_z(z)
    if not (math.isfinite(prominence) and prominence >= 0.0):
        raise ValueError(f"prominence must be finite and >= 0, got {prominence}")
    r = _bank(rewards)
    u, values = left_objective_at_knots(r, alpha=alpha, kl_weight=kl_weight)
    best = int(np.argmax(values))
    eta, value = float(u[best]), float(values[best])
    prominence = max(prominence, 1e-12 * (1.0 + abs(value)))
    bounds, rivals, warnings = [-math.inf, math.inf], [], []
    for end, order in ((0, np.arange(best, -1, -1)), (1, np.arange(best, u.size))):  # outward: left, right
        valley = _valley(values[order], prominence)
        if valley is None:
            continue
        bounds[end] = float(u[order[valley]])
        beyond = order[valley + 1 :]
        top = int(beyond[np.argmax(values[beyond])])
        rival = Peak(float(u[top]), float(values[top]), _gap_se(r, eta, float(u[top]), alpha, kl_weight))
        rivals.append(rival)
        if value - rival.value <= z * rival.gap_se:
            warnings.append(
                f"J_L has a competitive local maximum at eta {rival.eta:.4g} (J {rival.value:.4g}) besides the "
                f"bank's eta* {eta:.4g} (J {value:.4g}): the gap {value - rival.value:.3g} is within {z:g} "
                f"standard errors (SE {rival.gap_se:.3g}) for a bank of {r.size}, so another bank may choose the "
                f"other mode; refinement stays within ({bounds[0]:.4g}, {bounds[1]:.4g})"
            )
    return Basin(eta, value, bounds[0], bounds[1], tuple(rivals), tuple(warnings))


# --- the loop -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RefineRound:
    """One round: the threshold ``eta`` measured, the tail mass beyond it on ``n`` samples and its SE at alpha,
    the proposal, the bracket (lo, hi) after the round, whether the bracket moved, whether the measurement was
    within z SE of alpha (no update, eta kept), and the threshold for the next round."""

    round: int
    eta: float
    tail_mass: float
    n: int
    se: float
    proposal: float | None
    lo: float
    hi: float
    updated: bool
    within_noise: bool
    next_eta: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: open bracket ends (and a missing proposal) are None."""
        row = asdict(self)
        row.update(lo=_finite_or_none(self.lo), hi=_finite_or_none(self.hi), proposal=_finite_or_none(self.proposal))
        return row


@dataclass(frozen=True)
class RefineResult:
    """The refined threshold ``eta`` (the last round's ``next_eta``; ``eta0`` after zero rounds), the rounds,
    the final bracket, the left side's basin (None otherwise) and warnings for the caller to log."""

    eta: float
    rounds: tuple[RefineRound, ...]
    bracket: Bracket
    basin: Basin | None = None
    warnings: tuple[str, ...] = ()

    def records(self) -> list[dict[str, Any]]:
        """The rounds as JSON-able dicts (:meth:`RefineRound.to_dict`)."""
        return [r.to_dict() for r in self.rounds]


def _initial_bracket(
    eta0: float, side: str, alpha: float, bank_rewards: Sequence[float] | None, kl_weight: float | None, z: float
) -> tuple[Bracket, Basin | None]:
    """(-inf, inf), or on the left side with a bank the basin of the bank's eta* as walls."""
    if (bank_rewards is None) != (kl_weight is None):
        raise ValueError("bank_rewards and kl_weight go together (the left side's basin needs both)")
    if bank_rewards is None or side == "right":  # J_R is convex: one crossing, no basin needed
        return Bracket(), None
    basin = left_basin(bank_rewards, alpha=alpha, kl_weight=kl_weight, z=z)
    if not basin.lo < eta0 < basin.hi:
        raise ValueError(
            f"eta0 {eta0} is outside the basin ({basin.lo}, {basin.hi}) of the bank's eta* {basin.eta}; "
            "start from the bank's eta* (tfft.tail.solve_threshold) or drop bank_rewards"
        )
    return Bracket(basin.lo, basin.hi), basin


def refine_threshold(
    measure: Callable[[float], TailMeasurement],
    *,
    eta0: float,
    side: str,
    alpha: float,
    rounds: int,
    step: float,
    bank_rewards: Sequence[float] | np.ndarray | None = None,
    kl_weight: float | None = None,
    z: float = 2.0,
    on_round: Callable[[RefineRound], None] | None = None,
    on_warning: Callable[[str], None] | None = None,
) -> RefineResult:
    """Refine eta* from tail masses measured on models fine-tuned at the current threshold (DESIGN §5).

    Round k = 1..``rounds`` calls ``measure(eta_k)`` (eta_1 = ``eta0``), which must return m(eta_k) measured on
    the model fine-tuned at eta_k, then

    - updates the bracket (:func:`update_bracket`); when |m - alpha| <= z SE, SE = sqrt(alpha (1 - alpha) / n),
      the bracket stays and eta_{k+1} = eta_k (the threshold agrees with the measurement; measure again);
    - otherwise eta_{k+1} = :func:`next_threshold` (proposal = the measurement's), with a step of
      ``step`` * 2^(j - 1) on the j-th informative round the bracket is not closed.

    Left side with ``bank_rewards`` (the valid base-bank rewards) and ``kl_weight``: the bracket starts as the
    :func:`left_basin` of the bank's eta*, so refinement cannot settle on a crossing in another mode;
    ``eta0`` must lie inside it. On the right side they are ignored (J_R is convex).

    ``on_round`` is called with each round's record as soon as it is complete, ``on_warning`` with each warning
    as soon as it is known (before round 1 for the basin's); both are for logging. The warnings are also
    returned in the result.
    """
    side, alpha, z = _check_side(side), _check_alpha(alpha), _check_z(z)
    step = _check_positive(step, "step")
    eta0 = float(eta0)
    if not math.isfinite(eta0):
        raise ValueError(f"eta0 must be finite, got {eta0}")
    if isinstance(rounds, bool) or int(rounds) != rounds or rounds < 0:
        raise ValueError(f"rounds must be a non-negative integer, got {rounds!r}")
    bracket, basin = _initial_bracket(eta0, side, alpha, bank_rewards, kl_weight, z)
    warnings = basin.warnings if basin is not None else ()
    if on_warning is not None:
        for warning in warnings:
            on_warning(warning)
    eta, records, open_rounds = eta0, [], 0
    for k in range(1, int(rounds) + 1):
        m = measure(eta)
        if not isinstance(m, TailMeasurement):
            raise TypeError(f"measure must return a TailMeasurement, got {type(m).__name__}")
        within_noise = tail_direction(m.tail_mass, alpha=alpha, side=side, n=m.n, z=z) == 0
        updated_bracket = update_bracket(bracket, eta, m.tail_mass, alpha=alpha, side=side, n=m.n, z=z)
        updated, bracket = updated_bracket is not bracket, updated_bracket
        if within_noise:
            next_eta = eta
        else:
            open_rounds += not bracket.closed
            next_eta = next_threshold(
                bracket, alpha=alpha, step=step * 2.0 ** max(open_rounds - 1, 0), proposal=m.proposal,
                floor=0.5 / m.n,
            )
        record = RefineRound(
            round=k, eta=eta, tail_mass=m.tail_mass, n=m.n, se=standard_error(alpha, m.n), proposal=m.proposal,
            lo=bracket.lo, hi=bracket.hi, updated=updated, within_noise=within_noise, next_eta=float(next_eta),
        )
        records.append(record)
        if on_round is not None:
            on_round(record)
        eta = float(next_eta)
    return RefineResult(eta, tuple(records), bracket, basin, warnings)
