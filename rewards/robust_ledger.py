"""The bookkeeping of one :func:`rewards.robust.evaluate_robust` run: jobs, per-sample accounting, failure policy.

    x (n, d) -> jobs (index arrays into x) --run_jobs--> outcomes --Ledger.settle--> finished samples -> RobustResult

:class:`Ledger` holds the (n,) arrays and the queues of jobs and applies the failure policy of
:mod:`rewards.robust` (bisect, back off and call again, give up); :func:`run_jobs` keeps at most
``max_in_flight`` calls running until every sample is accounted for. Only the caller's thread touches a
ledger. Log records go to the ``rewards.robust`` logger, as before this module was split from it.
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
from typing import Any, Callable

import numpy as np

from rewards.robust import RobustResult
from rewards.robust_calls import Outcome, submit

__all__ = ["Job", "Ledger", "run_jobs"]

_log = logging.getLogger("rewards.robust")
_jitter = random.Random()


@dataclass(frozen=True)
class Job:
    """Samples ``indices`` to evaluate in one call; ``failures``: failed calls of its lineage so far;
    ``repeats``: identical re-calls so far (the back-off exponent)."""

    indices: np.ndarray
    failures: int
    repeats: int
    seq: int


class Ledger:
    """The bookkeeping of one :func:`rewards.robust.evaluate_robust` run over n samples, touched only by the caller's
    thread.

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
        self.ready: deque[Job] = deque(
            Job(np.arange(a, min(a + batch_size, n)), 0, 0, next(self.counter)) for a in range(0, n, batch_size)
        )
        self.waiting: list[tuple[float, int, Job]] = []
        self.last_failure: dict[str, str] = {}  # reason -> detail of the last call that made samples invalid
        self.n_calls = 0

    def later(self, indices: np.ndarray, failures: int, repeats: int, delay: float) -> None:
        """Queue a call of ``indices`` after ``delay`` seconds (plus up to 10% jitter)."""
        job = Job(indices, failures, repeats, next(self.counter))
        heapq.heappush(self.waiting, (time.monotonic() + delay * (1 + 0.1 * _jitter.random()), job.seq, job))

    def finish(self, i: int, reward: float, reason: str, spent: float) -> None:
        """Account for sample ``i``: valid with ``reward`` and ``spent`` seconds, or invalid with ``reason``."""
        assert not self.finished[i], f"sample {i} accounted for twice"
        self.finished[i] = True
        if reason:
            self.errors[i], self.seconds[i] = reason, self.share[i]
        else:
            self.rewards[i], self.valid[i], self.seconds[i] = reward, True, spent

    def settle(self, job: Job, out: Outcome) -> None:
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


def run_jobs(
    ledger: Ledger,
    call: Callable[[np.ndarray], Any],
    x: np.ndarray,
    pool: ThreadPoolExecutor | None,
    max_in_flight: int,
) -> None:
    """Call ``call`` on the rows of ``x`` (n, d) that the ledger's jobs name until none is ready, waiting or running:
    at most ``max_in_flight`` calls at once; the calls that complete together are settled in ``seq`` order."""
    ready, waiting = ledger.ready, ledger.waiting
    running: dict[Future[Outcome], Job] = {}
    while ready or waiting or running:
        now = time.monotonic()
        while waiting and waiting[0][0] <= now:
            ready.append(heapq.heappop(waiting)[2])
        while ready and len(running) < max_in_flight:
            job = ready.popleft()
            running[submit(pool, call, x[job.indices])] = job
        pause = max(0.0, waiting[0][0] - now) if waiting else None
        if not running:
            time.sleep(pause or 0.0)
            continue
        done, _ = wait(list(running), timeout=pause, return_when=FIRST_COMPLETED)
        for future in sorted(done, key=lambda f: running[f].seq):
            job = running.pop(future)
            ledger.n_calls += 1
            ledger.settle(job, future.result())
