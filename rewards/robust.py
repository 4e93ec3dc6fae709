"""Robust evaluation of a slow, failure-prone reward: chunks, calls in flight, retries, bisection.

    x (n, d) --chunks of batch_size--> call(chunk (b, d)) -> rewards (b,)     (max_in_flight calls at once)

``call`` evaluates one chunk. It fails by raising :class:`CallFailure` with a reason ('timeout', 'crash',
'malformed'); any other ``Exception`` is a failure with reason 'exception', and a result that is not b
numbers is 'malformed'. A returned NaN or inf marks that one sample invalid with reason 'nan' (a verdict
on the sample, not a failed call: it is not retried). ``call`` may also return ``(rewards, reasons)``
with one reason per sample ('' when valid) to mark samples invalid with its own reason.

Failure policy (issue 3, item 1):

- a failed chunk of several samples is bisected (``split=True``): both halves are called again after
  ``backoff_s``. A good sample that shared a chunk with a bad one still gets its reward; a bad sample
  ends up alone. With ``split=False`` the whole chunk is called again instead.
- a chunk that is not split (one sample, or any chunk with ``split=False``) is called again after
  ``backoff_s * 2**k`` (k = 0, 1, ..., plus up to 10% jitter) until its samples have been in
  ``retries + 1`` failed calls; then they are invalid with the reason of the last failure. Bisection
  counts towards that budget, so a sample that fails consistently costs about
  ``max(retries + 1, log2(batch_size) + 1)`` calls, and with ``split`` it is only ever declared invalid
  alone, never with a good sample.
- a failure raised with ``retry=False`` is still bisected (a multi-sample chunk with ``split``), but a
  chunk that is not split is declared invalid at once, whatever budget of retries is left: such a
  sample costs about ``log2(batch_size) + 1`` calls with ``split``, and exactly one without.

Every requested sample is accounted for exactly once. Calls run on ``max_in_flight`` threads (in the
caller's thread when it is 1); only the caller's thread touches the bookkeeping, so ``call`` is the only
thing that has to be thread-safe. Back-off waits never hold a thread: other chunks run meanwhile.

The machinery lives beside this module: :mod:`rewards.robust_calls` (one call on one chunk, timed, as an
outcome) and :mod:`rewards.robust_ledger` (the per-sample bookkeeping, the failure policy, the loop of calls).
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

if TYPE_CHECKING:  # torch is only needed by the adapters below, imported when they run
    from rewards.base import Reward, RewardBatch

__all__ = [
    "CALL_FAILURES",
    "DEFAULT_BACKOFF_S",
    "DEFAULT_MAX_IN_FLIGHT",
    "DEFAULT_RETRIES",
    "CallFailure",
    "RobustResult",
    "evaluate_robust",
    "evaluate_reward_robust",
]

CALL_FAILURES = ("timeout", "crash", "malformed", "exception")
# The one set of defaults for calling a reward (the reward pool's config, `Command`, both functions below).
DEFAULT_RETRIES = 2
DEFAULT_BACKOFF_S = 0.1
DEFAULT_MAX_IN_FLIGHT = 1


class CallFailure(Exception):
    """A failed call of a reward on one chunk: ``reason`` in :data:`CALL_FAILURES`, ``detail`` for logs.

    ``retry=False``: calling again with the same samples cannot succeed (the chunk may still be bisected,
    but a chunk that is not split is not called again).
    """

    def __init__(self, reason: str, detail: str = "", retry: bool = True):
        if reason not in CALL_FAILURES:
            raise ValueError(f"CallFailure reason must be one of {CALL_FAILURES}, got {reason!r}")
        super().__init__(reason, detail, retry)
        self.reason = reason
        self.detail = detail
        self.retry = bool(retry)

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}" if self.detail else self.reason


@dataclass(frozen=True)
class RobustResult:
    """Rewards of n samples with failure accounting.

    Attributes:
        rewards: (n,) float64; NaN where invalid.
        valid: (n,) bool.
        errors: n reasons, '' when valid, else 'timeout', 'crash', 'malformed', 'exception' or 'nan'.
        attempts: (n,) int64, calls that involved each sample (bisection and retries included).
        seconds: (n,) float64; valid: wall time of the successful call / its chunk size; invalid: the sum
            of its shares (call time / chunk size) over every call that involved it.
        n_calls: calls made in all.
        terms: per-sample parts of the reward, name -> (n,) float64, NaN where that part failed; None when
            the reward has none (`rewards.compose.WeightedSum`: each term's own value). The bank stores
            them as columns ``term.<name>``.
    """

    rewards: np.ndarray
    valid: np.ndarray
    errors: list[str]
    attempts: np.ndarray
    seconds: np.ndarray
    n_calls: int
    terms: dict[str, np.ndarray] | None = None

    def failure_counts(self) -> dict[str, int]:
        """Invalid samples per reason, e.g. ``{'timeout': 2, 'nan': 1}`` (reasons with 0 left out)."""
        counts: dict[str, int] = {}
        for reason in self.errors:
            if reason:
                counts[reason] = counts.get(reason, 0) + 1
        return counts

    def to_reward_batch(self) -> RewardBatch:
        """The same numbers as a :class:`rewards.base.RewardBatch` (errors None when all are valid)."""
        import torch

        from rewards.base import RewardBatch

        return RewardBatch(
            rewards=torch.from_numpy(self.rewards.copy()),
            valid=torch.from_numpy(self.valid.copy()),
            errors=None if bool(self.valid.all()) else list(self.errors),
            attempts=torch.from_numpy(self.attempts.astype(np.int64)),
            terms=None if self.terms is None else {k: torch.from_numpy(np.array(v, dtype=np.float64))
                                                   for k, v in self.terms.items()},
        )


def _check_args(x: np.ndarray, batch_size: int, max_in_flight: int, retries: int, backoff_s: float) -> None:
    """ValueError unless ``x`` is (n, d) and the call settings are in range."""
    if x.ndim != 2:
        raise ValueError(f"x must have shape (n, d), got {x.shape}")
    limits = (("batch_size", batch_size, 1), ("max_in_flight", max_in_flight, 1), ("retries", retries, 0))
    for name, value, low in limits:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if not (isinstance(backoff_s, (int, float)) and math.isfinite(backoff_s) and backoff_s >= 0):
        raise ValueError(f"backoff_s must be a finite number >= 0, got {backoff_s!r}")


def evaluate_robust(
    call: Callable[[np.ndarray], Any],
    x: np.ndarray,
    *,
    batch_size: int,
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
    retries: int = DEFAULT_RETRIES,
    backoff_s: float = DEFAULT_BACKOFF_S,
    split: bool = True,
) -> RobustResult:
    """Evaluate ``call`` on every row of ``x`` (n, d) in chunks of ``batch_size``; see the module doc."""
    # imported here: rewards.robust_ledger imports this module's RobustResult (and robust_calls its CallFailure)
    from rewards.robust_ledger import Ledger, run_jobs

    x = np.asarray(x)
    _check_args(x, batch_size, max_in_flight, retries, backoff_s)
    ledger = Ledger(x.shape[0], batch_size=batch_size, retries=retries, backoff_s=backoff_s, split=split)
    pool = ThreadPoolExecutor(max_in_flight, thread_name_prefix="reward-call") if max_in_flight > 1 else None
    try:
        run_jobs(ledger, call, x, pool, max_in_flight)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    return ledger.result()


def evaluate_reward_robust(
    reward: Reward,
    x: np.ndarray,
    *,
    batch_size: int,
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
    retries: int = DEFAULT_RETRIES,
    backoff_s: float = DEFAULT_BACKOFF_S,
    split: bool = True,
) -> RobustResult:
    """Evaluate an in-process :class:`rewards.base.Reward` on ``x`` (n, d) with :func:`evaluate_robust`.

    An exception raised by ``reward.evaluate`` fails its chunk (reason 'exception'; bisected and retried
    like any failure); samples the reward marks invalid keep its reason ('nan' when it gives none).
    Nothing can time out in a thread. With ``max_in_flight > 1`` the reward must be thread-safe. A reward
    with its own robust evaluation (:meth:`rewards.base.Reward.evaluate_detailed` returns a result, e.g.
    :class:`rewards.simulator.Command`) is used as is and the other arguments are ignored, except by a
    reward with ``robust_settings`` (`rewards.compose.WeightedSum`), which gets them for its in-process parts.
    """
    if reward.robust_settings:  # declared on Reward
        return reward.evaluate_detailed(
            np.asarray(x, dtype=np.float64), batch_size=batch_size, max_in_flight=max_in_flight,
            retries=retries, backoff_s=backoff_s, split=split,
        )
    detailed = reward.evaluate_detailed(np.asarray(x, dtype=np.float64))
    if detailed is not None:
        return detailed
    import torch

    def call(chunk: np.ndarray) -> tuple[np.ndarray, list[str]]:
        with torch.no_grad():  # grad mode is per thread: set it where the reward runs
            out = reward.evaluate(torch.from_numpy(np.array(chunk, dtype=np.float64)))
        values = out.rewards.detach().cpu().to(torch.float64).numpy().reshape(-1)
        ok = out.valid.detach().cpu().numpy().astype(bool).reshape(-1)
        given = list(out.errors) if out.errors is not None else [""] * len(ok)
        if len(given) != len(ok):
            raise CallFailure("malformed", f"{len(given)} errors for {len(ok)} samples")
        return values, ["" if v else (e or "nan") for v, e in zip(ok.tolist(), given)]

    return evaluate_robust(
        call,
        np.asarray(x, dtype=np.float64),
        batch_size=batch_size,
        max_in_flight=max_in_flight,
        retries=retries,
        backoff_s=backoff_s,
        split=split,
    )
