"""The bootstrap interval of the target statistics over the base bank (DESIGN.md section 5).

:func:`tfft.target.target_summary` estimates the tilted target's statistics from one bank; resampling the bank
(percentile bootstrap) shows how far that estimate moves with the bank's own sampling. :func:`batched_cvar`
computes the weighted CVaR of one bank under many weight vectors at once, which makes the resampling cheap.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from tfft.tail import _as_float64, _as_mask, _check_alpha, _check_side
from tfft.target import TailSummary, target_summary, tilt_log_weights

__all__ = ["TargetInterval", "batched_cvar", "target_interval"]

# Entries of one (resamples x bank) block in the bootstrap; bounds memory to a few tens of MB per temporary.
_BLOCK_ENTRIES = 4_000_000


def _check_confidence(confidence: float) -> float:
    confidence = float(confidence)
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence: expected a value in (0, 1), got {confidence}")
    return confidence


def _check_n_boot(n_boot: int) -> int:
    try:
        ok = not isinstance(n_boot, bool) and int(n_boot) == n_boot and n_boot >= 1
    except (TypeError, ValueError, OverflowError):
        ok = False
    if not ok:
        raise ValueError(f"n_boot: expected an integer >= 1, got {n_boot!r}")
    return int(n_boot)


def _lower_tail_cvars(r: np.ndarray, w: np.ndarray, levels: Sequence[float]) -> np.ndarray:
    """CVaR of the lower ``level`` mass for every row of weights and every level; shape (B, L).

    ``r`` (N,) ascending, ``w`` (B, N) non-negative weights in that order with positive row sums. With prefix sums
    C_i = sum_{k<=i} w_k and S_i = sum_{k<=i} w_k r_k, budget a = level * C_N and j the first index with C_j >= a
    (the boundary sample, counted fractionally): CVaR = (S_{j-1} + (a - C_{j-1}) r_j) / a.
    """
    cum = np.cumsum(w, axis=1)
    cum_wr = np.cumsum(w * r, axis=1)
    total = cum[:, -1]
    rows = np.arange(w.shape[0])
    out = np.empty((w.shape[0], len(levels)))
    for k, level in enumerate(levels):
        budget = level * total
        j = np.minimum((cum < budget[:, None]).sum(axis=1), r.size - 1)
        before = j - 1
        c_prev = np.where(before >= 0, cum[rows, before], 0.0)
        s_prev = np.where(before >= 0, cum_wr[rows, before], 0.0)
        out[:, k] = (s_prev + (budget - c_prev) * r[j]) / budget
    return out


def batched_cvar(rewards: Any, weights: Any, *, side: str, alpha: float) -> np.ndarray:
    """Weighted alpha-CVaR of one bank under B weight vectors at once; shape (B,) (DESIGN.md section 3).

    Row b equals ``tfft.tail.cvar(rewards, side=side, alpha=alpha, weights=weights[b])``: with the rewards sorted
    and cumulative weights C_i, sample i contributes the mass taken_i = clip(alpha C_N - C_{i-1}, 0, w_i) to the
    tail (right: counted from the top, left: from the bottom), and CVaR = sum_i taken_i r_i / (alpha C_N).

    Args:
        rewards: shape (N,), finite.
        weights: shape (B, N), finite, non-negative, each row with a positive sum.
        side: ``"right"`` or ``"left"``.
        alpha: tail mass in (0, 1].
    """
    side, alpha = _check_side(side), _check_alpha(alpha)
    r = _as_float64(rewards, "rewards")
    if r.size == 0 or not np.all(np.isfinite(r)):
        raise ValueError("rewards: expected a non-empty array of finite values")
    w = np.asarray(weights.detach().cpu() if isinstance(weights, torch.Tensor) else weights, dtype=np.float64)
    if w.ndim != 2 or w.shape[1] != r.size:
        raise ValueError(f"weights: expected shape (B, {r.size}), got {w.shape}")
    if not np.all(np.isfinite(w)) or np.any(w < 0.0) or not np.all(w.sum(axis=1) > 0.0):
        raise ValueError("weights: must be finite, non-negative, with a positive sum in every row")
    if side == "left":
        order = np.argsort(r, kind="stable")
        return _lower_tail_cvars(r[order], w[:, order], (alpha,))[:, 0]
    order = np.argsort(-r, kind="stable")  # the right tail of r is minus the left tail of -r
    return -_lower_tail_cvars(-r[order], w[:, order], (alpha,))[:, 0]


@dataclass(frozen=True)
class TargetInterval:
    """Percentile-bootstrap bounds for every statistic of :func:`tfft.target.target_summary` (see :func:`target_interval`).

    ``lo`` and ``hi`` hold, per statistic, the (1 - confidence)/2 and (1 + confidence)/2 percentiles of the
    ``n_boot`` resampled estimates; ``estimate`` is the full-bank estimate (equal to :func:`tfft.target.target_summary`);
    ``bias`` is the bootstrap bias estimate mean(resampled) - estimate. ``n`` and ``n_valid`` in all four are those
    of the bank.
    """

    estimate: TailSummary
    lo: TailSummary
    hi: TailSummary
    bias: TailSummary
    confidence: float
    n_boot: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-able {"lo": {mean, cvar_right, cvar_left}, "hi": {...}, "bias": {...}, "confidence", "n_boot"}."""

        def stats(summary: TailSummary) -> dict[str, Any]:
            payload = summary.to_dict()
            return {key: payload[key] for key in ("mean", "cvar_right", "cvar_left")}

        return {
            "lo": stats(self.lo),
            "hi": stats(self.hi),
            "bias": stats(self.bias),
            "confidence": float(self.confidence),
            "n_boot": int(self.n_boot),
        }


def _resampled_statistics(
    r: np.ndarray, log_w: np.ndarray, counts: np.ndarray, levels: tuple[float, ...]
) -> np.ndarray:
    """Weighted statistics of resampled banks: ``r`` (N,) ascending, ``log_w`` (N,) its log tilt weights,
    ``counts`` (B, N) multiplicities c_bi. Columns: mean, then CVaR right and CVaR left at each level; shape
    (B, 1 + 2L).

    Resample b has weights c_bi exp(log w_i - max_k log w_k). A row whose mass underflows (it misses every sample
    within ~460 nats of the largest log weight) is recomputed with its own largest present log weight as shift.
    """
    w = counts * np.exp(log_w - log_w.max())
    total = w.sum(axis=1)
    tiny = np.flatnonzero(~(total > 1e-200))
    if tiny.size:
        shift = np.where(counts[tiny] > 0, log_w, -np.inf).max(axis=1, keepdims=True)
        w[tiny] = counts[tiny] * np.exp(np.minimum(log_w - shift, 0.0))  # exponent > 0 only where c = 0
        total[tiny] = w[tiny].sum(axis=1)
    mean = (w @ r) / total
    right = -_lower_tail_cvars(-r[::-1], w[:, ::-1], levels)
    left = _lower_tail_cvars(r, w, levels)
    return np.column_stack([mean, right, left])


def _summary_from_row(row: np.ndarray, levels: tuple[float, ...], n: int, n_valid: int) -> TailSummary:
    k = len(levels)
    return TailSummary(
        n=n,
        n_valid=n_valid,
        mean=float(row[0]),
        cvar_right={f"{a:g}": float(v) for a, v in zip(levels, row[1 : 1 + k])},
        cvar_left={f"{a:g}": float(v) for a, v in zip(levels, row[1 + k :])},
    )


def _distinct_levels(levels: Sequence[float]) -> tuple[float, ...]:
    """The checked CVaR levels, one per key f"{level:g}" (the first of each), as in TailSummary, so that columns
    and keys stay aligned; shape (L,)."""
    unique: dict[str, float] = {}
    for level in levels:
        unique.setdefault(f"{_check_alpha(level):g}", _check_alpha(level))
    return tuple(unique.values())


def _sorted_valid_bank(
    rewards: Any, valid: Any, *, eta: float | None, side: str, alpha: float, kl_weight: float
) -> tuple[np.ndarray, np.ndarray]:
    """The N kept rewards (finite log tilt weight, and ``valid``) in ascending order, (N,) float64, and their log
    tilt weights in the same order, (N,)."""
    log_w = tilt_log_weights(rewards, eta=eta, side=side, alpha=alpha, kl_weight=kl_weight)
    keep = np.isfinite(log_w) if valid is None else np.isfinite(log_w) & _as_mask(valid, log_w.size)
    r = _as_float64(rewards, "rewards")[keep]
    order = np.argsort(r, kind="stable")
    return r[order], log_w[keep][order]


def _bootstrap_statistics(
    r: np.ndarray, log_w: np.ndarray, levels: tuple[float, ...], *, n_boot: int, seed: int
) -> np.ndarray:
    """:func:`_resampled_statistics` of ``n_boot`` resamples with replacement of the bank ``r`` (N,) ascending with
    log weights ``log_w`` (N,), drawn from ``default_rng(seed)`` in blocks of at most ``_BLOCK_ENTRIES`` entries;
    shape (n_boot, 1 + 2L)."""
    n = r.size
    rng = np.random.default_rng(seed)
    block = max(1, _BLOCK_ENTRIES // n)
    values = []
    for start in range(0, n_boot, block):
        b = min(block, n_boot - start)
        draws = rng.integers(0, n, size=(b, n)) + n * np.arange(b)[:, None]
        counts = np.bincount(draws.ravel(), minlength=b * n).reshape(b, n)
        values.append(_resampled_statistics(r, log_w, counts, levels))
    return np.concatenate(values, axis=0)


def _interval_from_bootstrap(
    estimate: TailSummary, boot: np.ndarray, levels: tuple[float, ...], *, confidence: float, n_boot: int
) -> TargetInterval:
    """The :class:`TargetInterval` of the full-bank ``estimate`` and the resampled statistics ``boot``
    (n_boot, 1 + 2L): percentile bounds and bias, per column."""
    lo, hi = np.quantile(boot, [(1.0 - confidence) / 2.0, (1.0 + confidence) / 2.0], axis=0)
    point = np.array(
        [estimate.mean, *estimate.cvar_right.values(), *estimate.cvar_left.values()], dtype=np.float64
    )
    sizes = (estimate.n, estimate.n_valid)
    return TargetInterval(
        estimate=estimate,
        lo=_summary_from_row(lo, levels, *sizes),
        hi=_summary_from_row(hi, levels, *sizes),
        bias=_summary_from_row(boot.mean(axis=0) - point, levels, *sizes),
        confidence=confidence,
        n_boot=n_boot,
    )


def target_interval(
    rewards: Any,
    *,
    eta: float | None,
    side: str,
    alpha: float,
    kl_weight: float,
    valid: Any = None,
    levels: Sequence[float] = (0.05, 0.1, 0.2),
    n_boot: int = 200,
    confidence: float = 0.9,
    seed: int = 0,
) -> TargetInterval:
    """Percentile-bootstrap interval for the target statistics of :func:`tfft.target.target_summary` (DESIGN.md section 5).

    The estimate of a statistic T (mean, CVaR right/left at each level) of p* ∝ q exp(g / gamma) is the
    self-normalised one, T(sum_i w_i delta_{r_i}) with w_i ∝ exp(g(r_i) / gamma) over the N valid bank rewards.
    Each of ``n_boot`` resamples draws N of the valid rewards with replacement (multiplicities c_i), and recomputes
    T with weights ∝ c_i exp(g(r_i) / gamma), with the same objective: eta, side, alpha and gamma are held fixed
    (eta is not re-solved, so the variability of eta* itself is not included). ``lo`` and ``hi`` are the
    (1 - confidence)/2 and (1 + confidence)/2 percentiles of the resampled values.

    What the interval means, precisely:

    - It measures the bank's sampling variability of the estimator: how much T would move had another bank of the
      same size been drawn from q. Its width scales like 1 / sqrt(N) at a fixed tilt and grows as the ESS falls.
      eta is held fixed, so the variability that eta* inherits from being solved on the same bank is left out.
    - It does not correct the bias. For tail statistics the self-normalised estimate is biased low: p* up-weights
      a far tail that a finite bank under-samples. A resample, drawn from the bank, has the same problem relative
      to the bank, so the resampled values sit below the full-bank estimate on average (``bias`` =
      mean(resampled) - estimate; estimate - bias is the usual first-order bias-corrected value). The interval's
      shift thus shows the bias, in the same direction as the bias, and only the part of it that the bank can
      see: no resample reaches beyond the bank's largest reward, so the bootstrap understates both the bias and
      the spread whenever that region carries target mass.
    - Measured on N(0, 1), r = x, right, alpha 0.1 (the exact target at the bank's eta by quadrature, 90%
      intervals over repeated banks): gamma 10 (ESS ~ 0.93 N) covers R-CVaR(0.1) in 88% of 200 banks of 20k and
      81% of banks of 5k; gamma 3 (ESS ~ 2,000 of 20k) covers it in only 46% of 200 banks (below it in 55%), with
      a bootstrap bias of -0.11 against an actual mean error of -0.30, and still only 62% of 40 banks of 200k
      (ESS ~ 12,000; bootstrap bias -0.04, actual -0.11). Treat the interval as a lower bound on
      the uncertainty, trustworthy only when the ESS is large, and always report the ESS beside it.

    Args:
        rewards: shape (N,); NaN/inf entries and entries with ``valid`` False are excluded.
        eta: the threshold (eta*); ``None`` for the expected-reward objective (g = r).
        side, alpha, kl_weight: the objective, as in :func:`tfft.target.tilt_weights`.
        valid: optional shape (N,) boolean mask.
        levels: CVaR levels in (0, 1], as in :func:`tfft.target.summarize`.
        n_boot: number of resamples, >= 1.
        confidence: two-sided coverage in (0, 1).
        seed: seed of the resampling generator (numpy ``default_rng``).
    """
    n_boot, confidence = _check_n_boot(n_boot), _check_confidence(confidence)
    levels = _distinct_levels(levels)
    estimate = target_summary(
        rewards, eta=eta, side=side, alpha=alpha, kl_weight=kl_weight, valid=valid, levels=levels
    )
    r, log_w = _sorted_valid_bank(rewards, valid, eta=eta, side=side, alpha=alpha, kl_weight=kl_weight)
    boot = _bootstrap_statistics(r, log_w, levels, n_boot=n_boot, seed=seed)
    return _interval_from_bootstrap(estimate, boot, levels, confidence=confidence, n_boot=n_boot)
