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

from tfft.basin import Basin, left_basin
from tfft.bracket import (
    Bracket,
    TailMeasurement,
    _check_alpha,
    _check_positive,
    _check_z,
    _finite_or_none,
    next_threshold,
    standard_error,
    tail_direction,
    update_bracket,
)
from tfft.tail import _check_side

__all__ = ["RefineResult", "RefineRound", "refine_threshold"]


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


def _check_arguments(
    side: str, alpha: float, z: float, step: float, eta0: float, rounds: int
) -> tuple[str, float, float, float, float]:
    """`refine_threshold`'s checked (side, alpha, z, step, eta0): eta0 finite, step > 0, rounds a non-negative
    integer (checked, not returned)."""
    side, alpha, z = _check_side(side), _check_alpha(alpha), _check_z(z)
    step = _check_positive(step, "step")
    eta0 = float(eta0)
    if not math.isfinite(eta0):
        raise ValueError(f"eta0 must be finite, got {eta0}")
    if isinstance(rounds, bool) or int(rounds) != rounds or rounds < 0:
        raise ValueError(f"rounds must be a non-negative integer, got {rounds!r}")
    return side, alpha, z, step, eta0


def _round(
    k: int, eta: float, m: TailMeasurement, bracket: Bracket, open_rounds: int, *, side: str, alpha: float,
    step: float, z: float,
) -> tuple[RefineRound, Bracket, int]:
    """Round k from the tail mass m measured at eta: (its record, the bracket after it, the informative rounds
    with an open bracket so far).

    Within z SE of alpha (`tail_direction` 0) the next threshold is eta itself; otherwise it is
    `next_threshold` on the updated bracket with the step ``step * 2^(j - 1)`` on the j-th such open round, and
    with a floor of 0.5 / n on the tail mass.
    """
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
    return record, bracket, open_rounds


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
    side, alpha, z, step, eta0 = _check_arguments(side, alpha, z, step, eta0, rounds)
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
        record, bracket, open_rounds = _round(k, eta, m, bracket, open_rounds, side=side, alpha=alpha, step=step, z=z)
        records.append(record)
        if on_round is not None:
            on_round(record)
        eta = record.next_eta
    return RefineResult(eta, tuple(records), bracket, basin, warnings)
