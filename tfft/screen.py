"""Screened evaluation: pay the expensive reward only where the tail can be.

Outside the tail the CVaR pseudo-reward is flat: on the right side g = (r - eta)_+ / alpha is 0 for every r <= eta,
so J_R(eta), the tilt weights and every tail statistic depend on such a sample only through its count (the left
side is the mirror image). A cheap *screen* s (any score that ranks samples like the reward) lets the expensive
reward r be called in order of how likely a sample is to be in the tail, until what is left is certainly outside:

1. **Audit.** A random subset A (``audit`` of the bank, at least ``min_audit`` samples) is evaluated in full.
2. **Screened order.** The other samples are evaluated in batches, tail-most screen first (descending s on the
   right, ascending on the left).
3. **Threshold on what is known.** After each batch, eta is solved on the evaluated rewards with every
   unevaluated sample placed at the far end of the evaluated ones (at min r on the right): a sample outside the
   tail counts the same wherever it lies, so eta is exactly the full bank's as long as no skipped sample is in
   the tail.
4. **Certificate.** The audited samples whose screen is beyond the current cut-off (those the screened order
   would have skipped) estimate the *miss rate* p, the probability that a skipped sample is in the tail (r beyond
   eta), with a one-sided Wilson upper bound p+ at ``confidence``. The skipped samples then hold about p+ x skipped
   tail samples at most; evaluation stops when that is at most ``tolerance`` times the tail samples found, i.e.
   when at most a fraction ``tolerance`` of the tail is (with that confidence) left unevaluated. Otherwise the next
   batch is evaluated; a screen that does not rank (the audit keeps finding tail samples beyond the cut-off)
   therefore ends in full evaluation.

A bound relative to the tail matters: with a strong tilt the tail is rare, and a bound on p alone would let most
of it go unevaluated. The price is that a rare tail needs a large audit to be certified (p+ >= about 2.7 / audited
samples beyond the cut-off at 95%): when the audit cannot certify, evaluation is complete, never wrong. Statistics
that need every sample (the mean) come from the audit alone.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np

from tfft.tail import solve_threshold

__all__ = ["ScreenResult", "screened_evaluate", "wilson_upper", "placeholder_rewards"]


@dataclass(frozen=True)
class ScreenResult:
    """What screened evaluation evaluated and why it stopped.

    Attributes:
        reward: (n,) float64, the expensive reward where evaluated, NaN elsewhere.
        evaluated: (n,) bool; audited: (n,) bool, the random audit subset (within ``evaluated``).
        eta: the threshold solved on :func:`placeholder_rewards` at the end.
        expensive_calls: samples evaluated (audit included); skipped: n - expensive_calls; audited: |A|.
        miss_rate: audited samples beyond the final cut-off that lie in the tail / audited samples beyond it
            (0 when none is beyond it); miss_rate_upper: its one-sided Wilson bound at ``confidence``.
        full: True when every sample was evaluated (no certificate was reached, or none was needed).
    """

    reward: np.ndarray
    evaluated: np.ndarray
    audited: np.ndarray
    eta: float
    expensive_calls: int
    skipped: int
    miss_rate: float
    miss_rate_upper: float
    full: bool

    def record(self) -> dict[str, Any]:
        """JSON-able accounting (``summary.json["screen"]``-style): calls, skipped, audited, miss rates, eta."""
        out = asdict(self)
        for key in ("reward", "evaluated", "audited"):
            out.pop(key)
        return out


def wilson_upper(k: int, m: int, confidence: float = 0.95) -> float:
    """One-sided upper Wilson score bound of a binomial proportion, k successes in m trials (1.0 when m = 0)."""
    if m <= 0:
        return 1.0
    if not 0.5 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0.5, 1), got {confidence}")
    z = _normal_quantile(confidence)
    p = k / m
    denom = 1.0 + z * z / m
    centre = p + z * z / (2 * m)
    spread = z * math.sqrt(p * (1 - p) / m + z * z / (4 * m * m))
    return min(1.0, (centre + spread) / denom)


def _normal_quantile(q: float) -> float:
    """Inverse standard normal CDF by bisection on erf (no scipy in the library)."""
    lo, hi = -10.0, 10.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if 0.5 * (1.0 + math.erf(mid / math.sqrt(2.0))) < q:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def placeholder_rewards(reward: np.ndarray, evaluated: np.ndarray, side: str) -> np.ndarray:
    """(n,) rewards with every unevaluated sample at the far end of the evaluated ones (min on the right, max on
    the left), where it counts as a sample outside the tail."""
    reward = np.asarray(reward, dtype=np.float64)
    known = reward[evaluated]
    if known.size == 0:
        raise ValueError("no evaluated sample")
    fill = float(known.min()) if side == "right" else float(known.max())
    return np.where(evaluated, reward, fill)


def screened_evaluate(
    screen: np.ndarray,
    evaluate: Callable[[np.ndarray], np.ndarray],
    *,
    side: str,
    alpha: float,
    kl_weight: float,
    audit: float = 0.1,
    min_audit: int = 100,
    tolerance: float = 0.01,
    confidence: float = 0.95,
    batch_size: int | None = None,
    seed: int = 0,
) -> ScreenResult:
    """Evaluate the expensive reward on as few samples as the certificate allows (see the module doc).

    Args:
        screen: (n,) cheap scores, higher = more rewarding (finite).
        evaluate: indices (k,) int -> (k,) float64 expensive rewards of those samples (finite: a failure policy
            belongs to the caller).
        side, alpha, kl_weight: the CVaR objective (`tfft.tail.solve_threshold`).
        audit: fraction of the bank evaluated at random; min_audit: at least this many (all when n is smaller).
        tolerance: largest acceptable fraction of the tail left unevaluated (upper bound); confidence: of it.
        batch_size: samples per screened batch (default: max(alpha n / 4, 1)).
        seed: of the audit's draw.

    Returns:
        :class:`ScreenResult`.
    """
    screen = _check_screen(screen, side, audit, tolerance)
    n = screen.size
    audited = _draw_audit(n, audit, min_audit, seed)
    reward = np.full(n, np.nan)
    evaluated = np.zeros(n, dtype=bool)
    _evaluate_into(evaluate, np.flatnonzero(audited), reward, evaluated)
    rest = _screened_order(screen, audited, side)
    step = batch_size or max(int(alpha * n / 4), 1)
    done = 0
    while True:
        filled = placeholder_rewards(reward, evaluated, side)
        eta = solve_threshold(filled, side=side, alpha=alpha, kl_weight=kl_weight).eta
        if done >= rest.size:
            return _result(reward, evaluated, audited, eta, 0, 0, full=True, confidence=confidence)
        k, m, certified = _certificate(
            screen, reward, evaluated, audited, rest, done, eta, side=side, tolerance=tolerance, confidence=confidence
        )
        if certified:
            return _result(reward, evaluated, audited, eta, k, m, full=False, confidence=confidence)
        _evaluate_into(evaluate, rest[done:done + step], reward, evaluated)
        done = min(done + step, rest.size)


def _check_screen(screen: np.ndarray, side: str, audit: float, tolerance: float) -> np.ndarray:
    """The screen as a (n,) float64 vector, checked non-empty and finite, with side, audit and tolerance."""
    screen = np.asarray(screen, dtype=np.float64).reshape(-1)
    n = screen.size
    if n == 0 or not np.all(np.isfinite(screen)):
        raise ValueError("screen: expected a non-empty vector of finite scores")
    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' or 'left', got {side!r}")
    if not 0.0 < audit <= 1.0 or not 0.0 < tolerance < 1.0:
        raise ValueError(f"audit must be in (0, 1] and tolerance in (0, 1), got {audit} and {tolerance}")
    return screen


def _draw_audit(n: int, audit: float, min_audit: int, seed: int) -> np.ndarray:
    """The audit A as a (n,) bool mask: max(ceil(audit n), min_audit) samples (all when n is smaller), drawn
    without replacement with ``np.random.default_rng(seed)``."""
    rng = np.random.default_rng(seed)
    n_audit = min(n, max(int(math.ceil(audit * n)), min_audit))
    audited = np.zeros(n, dtype=bool)
    audited[rng.choice(n, size=n_audit, replace=False)] = True
    return audited


def _evaluate_into(
    evaluate: Callable[[np.ndarray], np.ndarray], indices: np.ndarray, reward: np.ndarray, evaluated: np.ndarray
) -> None:
    """Evaluate the samples ``indices`` (k,) and write their rewards into reward (n,) and True into evaluated
    (n,), in place; the rewards must be k finite values."""
    values = np.asarray(evaluate(indices), dtype=np.float64).reshape(-1)
    if values.shape != indices.shape or not np.all(np.isfinite(values)):
        raise ValueError(f"evaluate must return {indices.size} finite rewards")
    reward[indices] = values
    evaluated[indices] = True


def _screened_order(screen: np.ndarray, audited: np.ndarray, side: str) -> np.ndarray:
    """The samples outside the audit, tail-most screen first: descending s on the right, ascending on the left
    (a stable sort: ties keep index order); (n - |A|,) indices."""
    rest = np.flatnonzero(~audited)
    return rest[np.argsort(-screen[rest] if side == "right" else screen[rest], kind="stable")]


def _certificate(
    screen: np.ndarray, reward: np.ndarray, evaluated: np.ndarray, audited: np.ndarray, rest: np.ndarray, done: int,
    eta: float, *, side: str, tolerance: float, confidence: float,
) -> tuple[int, int, bool]:
    """(k, m, certified) after the first ``done`` samples of the screened order ``rest``, at threshold eta.

    The m audited samples beyond the cut-off (the screen of the last sample evaluated in order: those the order
    has not reached) hold k in the tail; certified when m > 0 and the Wilson bound p+ of k / m times the
    unevaluated samples is at most ``tolerance`` times the tail samples found (at least 1).
    """
    n = screen.size
    cut = screen[rest[done - 1]] if done else (np.inf if side == "right" else -np.inf)
    # the audited samples the screened order has not reached: would the unevaluated ones be in the tail?
    beyond = audited & ((screen <= cut) if side == "right" else (screen >= cut))
    in_tail = (reward > eta) if side == "right" else (reward < eta)
    k, m = int((beyond & in_tail).sum()), int(beyond.sum())
    found = int((evaluated & in_tail).sum())
    certified = m > 0 and wilson_upper(k, m, confidence) * (n - evaluated.sum()) <= tolerance * max(found, 1)
    return k, m, certified


def _result(
    reward: np.ndarray, evaluated: np.ndarray, audited: np.ndarray, eta: float, k: int, m: int, *, full: bool,
    confidence: float,
) -> ScreenResult:
    calls = int(evaluated.sum())
    return ScreenResult(
        reward=reward, evaluated=evaluated, audited=audited, eta=float(eta), expensive_calls=calls,
        skipped=int(evaluated.size - calls), miss_rate=k / m if m else 0.0,
        miss_rate_upper=0.0 if full else wilson_upper(k, m, confidence), full=full,
    )
