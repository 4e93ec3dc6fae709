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
"""

from __future__ import annotations

import heapq
import logging
import math
import random
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
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
_log = logging.getLogger(__name__)
_jitter = random.Random()


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


@dataclass(frozen=True)
class _Job:
    """Samples ``indices`` to evaluate in one call; ``failures``: failed calls of its lineage so far;
    ``repeats``: identical re-calls so far (the back-off exponent)."""

    indices: np.ndarray
    failures: int
    repeats: int
    seq: int


@dataclass(frozen=True)
class _Outcome:
    """What one call gave: rewards and per-sample reasons, or a failure reason (and whether calling again
    may help); its wall time."""

    rewards: np.ndarray | None
    reasons: list[str] | None
    failure: str
    detail: str
    seconds: float
    retry: bool = True


def _parse(out: Any, size: int) -> tuple[np.ndarray, list[str] | None]:
    """A call's return value -> ((size,) float64 rewards, reasons or None); CallFailure if malformed."""
    reasons = None
    if isinstance(out, tuple):
        if len(out) != 2:
            raise CallFailure("malformed", f"expected (rewards, reasons), got a tuple of {len(out)}")
        out, reasons = out
        reasons = [str(r) for r in reasons]
        if len(reasons) != size:
            raise CallFailure("malformed", f"{len(reasons)} reasons for {size} samples")
    try:
        rewards = np.asarray(out, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise CallFailure("malformed", f"rewards are not numbers: {exc}") from None
    if rewards.shape != (size,):
        raise CallFailure("malformed", f"expected rewards of shape ({size},), got {rewards.shape}")
    return rewards, reasons


def _attempt(call: Callable[[np.ndarray], Any], chunk: np.ndarray) -> _Outcome:
    start = time.perf_counter()
    try:
        rewards, reasons = _parse(call(chunk), len(chunk))
    except CallFailure as exc:
        return _Outcome(None, None, exc.reason, exc.detail, time.perf_counter() - start, exc.retry)
    except Exception as exc:  # any error of the reward is a failed call, never the end of the run
        return _Outcome(None, None, "exception", f"{type(exc).__name__}: {exc}", time.perf_counter() - start)
    return _Outcome(rewards, reasons, "", "", time.perf_counter() - start)


def _check_args(x: np.ndarray, batch_size: int, max_in_flight: int, retries: int, backoff_s: float) -> None:
    if x.ndim != 2:
        raise ValueError(f"x must have shape (n, d), got {x.shape}")
    limits = (("batch_size", batch_size, 1), ("max_in_flight", max_in_flight, 1), ("retries", retries, 0))
    for name, value, low in limits:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if not (isinstance(backoff_s, (int, float)) and math.isfinite(backoff_s) and backoff_s >= 0):
        raise ValueError(f"backoff_s must be a finite number >= 0, got {backoff_s!r}")


class _Ledger:
    """The bookkeeping of one :func:`evaluate_robust` run over n samples, touched only by the caller's thread.

    Per sample, shape (n,): ``rewards`` (NaN until valid), ``valid``, ``errors``, ``attempts``, ``share`` (seconds of
    the calls it took part in, split evenly over each chunk), ``seconds`` and ``finished``. Jobs are ``ready`` (to
    call now, first the chunks of ``batch_size`` in order) or ``waiting`` (a heap of (ready time, seq, job): back-off
    without a thread); ``settle`` applies the failure policy (``retries``, ``backoff_s``, ``split``) to an outcome.
    """

    def __init__(self, n: int, *, batch_size: int, retries: int, backoff_s: float, split: bool):
        self.n, self.retries, self.backoff_s, self.split = n, retries, backoff_s, split
        self.rewards = np.full(n, np.nan)
        self.valid = np.zeros(n, dtype=bool)
        self.errors = [""] * n
        self.attempts = np.zeros(n, dtype=np.int64)
        self.share = np.zeros(n)
        self.seconds = np.zeros(n)
        self.finished = np.zeros(n, dtype=bool)
        self.counter = iter(range(1 << 62))
        self.ready: deque[_Job] = deque(
            _Job(np.arange(a, min(a + batch_size, n)), 0, 0, next(self.counter)) for a in range(0, n, batch_size)
        )
        self.waiting: list[tuple[float, int, _Job]] = []
        self.last_failure: dict[str, str] = {}  # reason -> detail of the last call that made samples invalid
        self.n_calls = 0

    def later(self, indices: np.ndarray, failures: int, repeats: int, delay: float) -> None:
        """Queue a call of ``indices`` after ``delay`` seconds (plus up to 10% jitter)."""
        job = _Job(indices, failures, repeats, next(self.counter))
        heapq.heappush(self.waiting, (time.monotonic() + delay * (1 + 0.1 * _jitter.random()), job.seq, job))

    def finish(self, i: int, reward: float, reason: str, spent: float) -> None:
        """Account for sample ``i``: valid with ``reward`` and ``spent`` seconds, or invalid with ``reason``."""
        assert not self.finished[i], f"sample {i} accounted for twice"
        self.finished[i] = True
        if reason:
            self.errors[i], self.seconds[i] = reason, self.share[i]
        else:
            self.rewards[i], self.valid[i], self.seconds[i] = reward, True, spent

    def settle(self, job: _Job, out: _Outcome) -> None:
        """Record one call's outcome: finish its samples, or bisect, retry or give up on a failed chunk."""
        idx = job.indices
        self.attempts[idx] += 1
        self.share[idx] += out.seconds / len(idx)
        if not out.failure:
            assert out.rewards is not None
            for k, i in enumerate(idx):
                reason = out.reasons[k] if out.reasons is not None else ""
                if not reason and not math.isfinite(out.rewards[k]):
                    reason = "nan"
                self.finish(int(i), float(out.rewards[k]), reason, out.seconds / len(idx))
            return
        failures = job.failures + 1
        _log.debug("call on %d samples failed (%s): %s", len(idx), out.failure, out.detail)
        if self.split and len(idx) > 1:
            half = len(idx) // 2
            self.later(idx[:half], failures, 0, self.backoff_s)
            self.later(idx[half:], failures, 0, self.backoff_s)
        elif failures <= self.retries and out.retry:
            self.later(idx, failures, job.repeats + 1, self.backoff_s * 2**job.repeats)
        else:
            self.last_failure[out.failure] = out.detail
            for i in idx:
                self.finish(int(i), math.nan, out.failure, 0.0)

    def result(self) -> RobustResult:
        """The :class:`RobustResult` once every sample is accounted for; one warning line if some were lost."""
        assert self.finished.all(), "a sample was never accounted for"
        if self.last_failure:  # one line per evaluation, not per sample: a bank may lose thousands
            lost = sum(1 for e in self.errors if e in self.last_failure)
            details = "; ".join(f"{reason}: {detail}" for reason, detail in sorted(self.last_failure.items()))
            _log.warning("%d of %d samples invalid after their retries (last failures: %s)", lost, self.n, details)
        return RobustResult(self.rewards, self.valid, self.errors, self.attempts, self.seconds, self.n_calls)


def _submit(pool: ThreadPoolExecutor | None, call: Callable[[np.ndarray], Any], chunk: np.ndarray) -> Future[_Outcome]:
    """``_attempt(call, chunk)`` (chunk (b, d)) on the pool, or at once in the caller's thread without one."""
    if pool is not None:
        return pool.submit(_attempt, call, chunk)
    future: Future[_Outcome] = Future()
    future.set_result(_attempt(call, chunk))
    return future


def _run_jobs(
    ledger: _Ledger,
    call: Callable[[np.ndarray], Any],
    x: np.ndarray,
    pool: ThreadPoolExecutor | None,
    max_in_flight: int,
) -> None:
    """Call ``call`` on the rows of ``x`` (n, d) that the ledger's jobs name until none is ready, waiting or running:
    at most ``max_in_flight`` calls at once; the calls that complete together are settled in ``seq`` order."""
    ready, waiting = ledger.ready, ledger.waiting
    running: dict[Future[_Outcome], _Job] = {}
    while ready or waiting or running:
        now = time.monotonic()
        while waiting and waiting[0][0] <= now:
            ready.append(heapq.heappop(waiting)[2])
        while ready and len(running) < max_in_flight:
            job = ready.popleft()
            running[_submit(pool, call, x[job.indices])] = job
        pause = max(0.0, waiting[0][0] - now) if waiting else None
        if not running:
            time.sleep(pause or 0.0)
            continue
        done, _ = wait(list(running), timeout=pause, return_when=FIRST_COMPLETED)
        for future in sorted(done, key=lambda f: running[f].seq):
            job = running.pop(future)
            ledger.n_calls += 1
            ledger.settle(job, future.result())


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
    x = np.asarray(x)
    _check_args(x, batch_size, max_in_flight, retries, backoff_s)
    ledger = _Ledger(x.shape[0], batch_size=batch_size, retries=retries, backoff_s=backoff_s, split=split)
    pool = ThreadPoolExecutor(max_in_flight, thread_name_prefix="reward-call") if max_in_flight > 1 else None
    try:
        _run_jobs(ledger, call, x, pool, max_in_flight)
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
