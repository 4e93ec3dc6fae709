"""One call of a reward on one chunk, for :func:`rewards.robust.evaluate_robust`: timed, its verdict kept.

    call(chunk (b, d)) -> rewards (b,) | (rewards (b,), reasons [b])   ->   Outcome(rewards, reasons | failure, seconds)

:func:`attempt` never raises: a :class:`rewards.robust.CallFailure` keeps its reason, detail and ``retry``; any
other ``Exception`` is reason 'exception'; a return value that is not b numbers (with b reasons) is 'malformed'.
:func:`submit` runs an attempt on a thread pool, or at once in the caller's thread without one.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from rewards.robust import CallFailure

__all__ = ["Outcome", "parse_output", "attempt", "submit"]


@dataclass(frozen=True)
class Outcome:
    """What one call gave: rewards (b,) and per-sample reasons, or a failure reason (and whether calling
    again may help); its wall time."""

    rewards: np.ndarray | None
    reasons: list[str] | None
    failure: str
    detail: str
    seconds: float
    retry: bool = True


def parse_output(out: Any, size: int) -> tuple[np.ndarray, list[str] | None]:
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


def attempt(call: Callable[[np.ndarray], Any], chunk: np.ndarray) -> Outcome:
    """``call(chunk)`` on a chunk (b, d), timed, as an :class:`Outcome`; never raises an ``Exception``."""
    start = time.perf_counter()
    try:
        rewards, reasons = parse_output(call(chunk), len(chunk))
    except CallFailure as exc:
        return Outcome(None, None, exc.reason, exc.detail, time.perf_counter() - start, exc.retry)
    except Exception as exc:  # any error of the reward is a failed call, never the end of the run
        return Outcome(None, None, "exception", f"{type(exc).__name__}: {exc}", time.perf_counter() - start)
    return Outcome(rewards, reasons, "", "", time.perf_counter() - start)


def submit(pool: ThreadPoolExecutor | None, call: Callable[[np.ndarray], Any], chunk: np.ndarray) -> Future[Outcome]:
    """``attempt(call, chunk)`` (chunk (b, d)) on the pool, or at once in the caller's thread without one."""
    if pool is not None:
        return pool.submit(attempt, call, chunk)
    future: Future[Outcome] = Future()
    future.set_result(attempt(call, chunk))
    return future
