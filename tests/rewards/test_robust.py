"""The robust evaluation engine: accounting, bisection, retries, back-off, calls in flight (no processes)."""

from __future__ import annotations

import pickle
import threading
import time

import numpy as np
import pytest
import torch

from rewards.base import FunctionReward, Reward, RewardBatch
from rewards.robust import CallFailure, RobustResult, evaluate_reward_robust, evaluate_robust


class Recorder:
    """A call that sums each row, fails (``reason``) on chunks holding a row with x[0] < 0, and records
    every call's chunk size, start time and the number of calls running at once."""

    def __init__(self, reason: str = "crash", sleep_s: float = 0.0):
        self.reason, self.sleep_s = reason, sleep_s
        self.sizes: list[int] = []
        self.starts: list[float] = []
        self.running = self.max_running = 0
        self.lock = threading.Lock()

    def __call__(self, chunk: np.ndarray) -> np.ndarray:
        with self.lock:
            self.sizes.append(len(chunk))
            self.starts.append(time.monotonic())
            self.running += 1
            self.max_running = max(self.max_running, self.running)
        try:
            time.sleep(self.sleep_s)
            if (chunk[:, 0] < 0).any():
                if self.reason == "exception":
                    raise RuntimeError("boom")
                raise CallFailure(self.reason, "bad row")
            return chunk.sum(1)
        finally:
            with self.lock:
                self.running -= 1


def samples(n: int, bad: list[int] | np.ndarray = ()) -> np.ndarray:
    """(n, 2) rows (1 + i, i / 10); rows in ``bad`` get a negative first coordinate."""
    x = np.stack([1.0 + np.arange(n), np.arange(n) / 10], 1)
    x[list(bad), 0] = -1.0
    return x


def check_accounting(result: RobustResult, x: np.ndarray, bad: np.ndarray, calls: Recorder) -> None:
    n = len(x)
    assert result.valid.sum() + (~result.valid).sum() == n and len(result.errors) == n
    np.testing.assert_array_equal(result.valid, ~bad)
    np.testing.assert_array_equal(result.rewards[~bad], x[~bad].sum(1))  # no valid result lost
    assert np.isnan(result.rewards[bad]).all()
    assert all((e == "") == v for e, v in zip(result.errors, result.valid))
    assert result.n_calls == len(calls.sizes)
    assert result.attempts.sum() == sum(calls.sizes)  # attempts are the calls each sample was in
    assert (result.attempts >= 1).all()


def test_all_good_keeps_order_and_counts_calls():
    x, calls = samples(23), Recorder()
    result = evaluate_robust(calls, x, batch_size=5, max_in_flight=3, retries=2, backoff_s=0.0)
    check_accounting(result, x, np.zeros(23, bool), calls)
    assert result.n_calls == 5 and calls.sizes.count(5) == 4
    assert (result.attempts == 1).all() and result.failure_counts() == {}
    assert result.rewards.dtype == np.float64 and result.attempts.dtype == np.int64


@pytest.mark.parametrize("retries, expected", [(0, 5), (2, 5), (6, 7)])
def test_bisection_isolates_one_bad_sample(retries, expected):
    # chunk of 16 -> 8 -> 4 -> 2 -> 1: the bad sample is in 5 failed calls, then retried alone
    # until it has failed retries + 1 times; its 15 neighbours all get their rewards.
    x, calls = samples(16, bad=[11]), Recorder()
    result = evaluate_robust(calls, x, batch_size=16, retries=retries, backoff_s=0.0)
    bad = np.arange(16) == 11
    check_accounting(result, x, bad, calls)
    assert result.attempts[11] == expected and result.errors[11] == "crash"
    assert result.n_calls == 1 + 2 * 4 + (expected - 5)


@pytest.mark.parametrize("seed", range(6))
def test_random_faults_every_sample_accounted_exactly_once(seed):
    rng = np.random.default_rng(seed)
    n, batch_size, retries = int(rng.integers(1, 60)), int(rng.integers(1, 17)), int(rng.integers(0, 3))
    bad = rng.random(n) < 0.2
    reason = ["crash", "timeout", "exception"][seed % 3]
    x, calls = samples(n, bad=np.flatnonzero(bad)), Recorder(reason=reason)
    result = evaluate_robust(
        calls, x, batch_size=batch_size, max_in_flight=1 + seed % 3, retries=retries, backoff_s=0
    )
    check_accounting(result, x, bad, calls)
    assert (result.attempts[bad] >= retries + 1).all()
    assert result.failure_counts() == ({reason: int(bad.sum())} if bad.any() else {})


def test_split_false_fails_the_whole_chunk_after_its_retries():
    x, calls = samples(8, bad=[1]), Recorder(reason="timeout")
    result = evaluate_robust(calls, x, batch_size=4, retries=2, backoff_s=0.0, split=False)
    assert result.errors == ["timeout"] * 4 + [""] * 4
    assert calls.sizes == [4, 4, 4, 4] and result.attempts.tolist() == [3] * 4 + [1] * 4


@pytest.mark.parametrize(
    "fail_first, retries, valid", [(1, 2, True), (2, 2, True), (3, 2, False), (1, 0, False)]
)
def test_transient_failures_are_retried(fail_first, retries, valid):
    seen: dict[bytes, int] = {}

    def flaky(chunk: np.ndarray) -> np.ndarray:
        key = chunk.tobytes()
        seen[key] = seen.get(key, 0) + 1
        if seen[key] <= fail_first:
            raise CallFailure("crash", "transient")
        return chunk.sum(1)

    result = evaluate_robust(flaky, samples(3), batch_size=1, retries=retries, backoff_s=0.0)
    assert result.valid.all() == valid
    assert result.attempts.tolist() == [min(fail_first, retries) + 1] * 3
    assert result.errors == ["" if valid else "crash"] * 3


@pytest.mark.parametrize("split, attempts", [(True, 4), (False, 1)])
def test_a_failure_marked_no_retry_is_bisected_but_never_repeated(split, attempts):
    # batch of 8 with a bad sample 5: 8 -> 4 -> 2 -> 1 with split (4 calls), then no repeat although
    # retries allows 6 more; without split the whole chunk fails after its one call
    def call(chunk: np.ndarray) -> np.ndarray:
        if (chunk[:, 0] < 0).any():
            raise CallFailure("exception", "HTTP 400: bad sample", retry=False)
        return chunk.sum(1)

    x = samples(8, bad=[5])
    result = evaluate_robust(call, x, batch_size=8, retries=6, backoff_s=0.0, split=split)
    assert result.attempts[5] == attempts and result.errors[5] == "exception"
    if split:
        assert result.errors == ["exception" if i == 5 else "" for i in range(8)]
        np.testing.assert_array_equal(result.rewards[result.valid], x[result.valid].sum(1))
    else:
        assert result.errors == ["exception"] * 8 and result.n_calls == 1
    failure = pickle.loads(pickle.dumps(CallFailure("crash", "x", retry=False)))
    assert (failure.reason, failure.detail, failure.retry) == ("crash", "x", False)
    assert CallFailure("crash").retry and str(failure) == "crash: x"


def test_backoff_doubles_between_repeats():
    calls = Recorder()
    result = evaluate_robust(calls, samples(1, bad=[0]), batch_size=1, retries=3, backoff_s=0.05)
    gaps = np.diff(calls.starts)
    assert result.attempts.tolist() == [4] and len(gaps) == 3
    for gap, wanted in zip(gaps, [0.05, 0.1, 0.2]):
        assert wanted <= gap < 1.1 * wanted + 0.05


def test_nan_and_inf_are_invalid_without_retry():
    def call(chunk: np.ndarray) -> np.ndarray:
        out = chunk.sum(1)
        return np.where(chunk[:, 0] == 2, np.nan, np.where(chunk[:, 0] == 4, np.inf, out))

    result = evaluate_robust(call, samples(5), batch_size=5, retries=3, backoff_s=0.0)
    assert result.errors == ["", "nan", "", "nan", ""] and result.n_calls == 1
    assert result.attempts.tolist() == [1] * 5 and result.failure_counts() == {"nan": 2}


@pytest.mark.parametrize(
    "returned, reason",
    [
        (np.zeros(3), "malformed"),
        (np.zeros((2, 1)), "malformed"),
        ("abc", "malformed"),
        (RuntimeError, "exception"),
    ],
)
def test_bad_returns_and_exceptions_fail_the_call(returned, reason):
    def call(chunk: np.ndarray) -> np.ndarray:
        if returned is RuntimeError:
            raise RuntimeError("reward bug")
        return returned

    result = evaluate_robust(call, samples(2), batch_size=2, retries=1, backoff_s=0.0)
    assert result.errors == [reason, reason] and result.attempts.tolist() == [2, 2]


def test_per_sample_reasons_from_the_call():
    def call(chunk: np.ndarray) -> tuple[np.ndarray, list[str]]:
        return chunk.sum(1), ["malformed" if c == 2 else "" for c in chunk[:, 0]]

    result = evaluate_robust(call, samples(3), batch_size=3, retries=2, backoff_s=0.0)
    assert result.errors == ["", "malformed", ""] and result.n_calls == 1


def test_calls_in_flight_overlap_and_max_in_flight_is_respected():
    calls = Recorder(sleep_s=0.1)
    result = evaluate_robust(calls, samples(16), batch_size=2, max_in_flight=4, retries=0, backoff_s=0.0)
    assert result.n_calls == 8 and result.valid.all()
    assert calls.max_running == 4  # four calls were running at the same moment
    np.testing.assert_allclose(result.seconds, 0.05, rtol=0.5)  # call time / chunk size


def test_backoff_does_not_hold_a_slot():
    # one bad chunk backs off for 0.3 s while the good chunks use the only slot
    calls = Recorder(sleep_s=0.02)
    x = samples(6, bad=[0])
    result = evaluate_robust(calls, x, batch_size=1, max_in_flight=1, retries=1, backoff_s=0.3)
    assert calls.sizes == [1] * 7 and result.attempts.tolist() == [2, 1, 1, 1, 1, 1]
    assert calls.starts[-1] - calls.starts[0] >= 0.3  # the retry came last


def test_single_slot_runs_in_the_callers_thread_and_results_are_deterministic():
    threads: set[str] = set()

    def call(chunk: np.ndarray) -> np.ndarray:
        threads.add(threading.current_thread().name)
        return chunk.sum(1)

    evaluate_robust(call, samples(4), batch_size=1, max_in_flight=1)
    assert threads == {threading.current_thread().name}
    rng = np.random.default_rng(0)

    def jittery(chunk: np.ndarray) -> np.ndarray:
        time.sleep(0.01 * rng.random())
        if (chunk[:, 0] % 7 == 0).any():
            raise CallFailure("crash")
        return chunk.sum(1)

    runs = [
        evaluate_robust(jittery, samples(40), batch_size=4, max_in_flight=4, retries=1, backoff_s=0)
        for _ in range(2)
    ]
    np.testing.assert_array_equal(runs[0].rewards, runs[1].rewards)
    assert runs[0].errors == runs[1].errors and (runs[0].attempts == runs[1].attempts).all()


def test_seconds_of_invalid_samples_sum_their_shares():
    calls = Recorder(sleep_s=0.04)
    result = evaluate_robust(calls, samples(2, bad=[1]), batch_size=2, retries=0, backoff_s=0.0)
    assert result.valid.tolist() == [True, False]
    assert 0.035 <= result.seconds[0] < 0.1  # its own successful call, alone
    assert 0.055 <= result.seconds[1] < 0.15  # half of the pair's call + its own call


def test_empty_input_and_bad_arguments():
    empty = evaluate_robust(Recorder(), np.zeros((0, 3)), batch_size=4)
    assert empty.n_calls == 0 and empty.rewards.shape == (0,) and empty.errors == []
    for kwargs, name in [
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": 2, "max_in_flight": 0}, "max_in_flight"),
        ({"batch_size": 2, "retries": -1}, "retries"),
        ({"batch_size": 2, "backoff_s": -1.0}, "backoff_s"),
        ({"batch_size": True}, "batch_size"),
    ]:
        with pytest.raises(ValueError, match=name):
            evaluate_robust(Recorder(), samples(2), **kwargs)
    with pytest.raises(ValueError, match="shape"):
        evaluate_robust(Recorder(), np.zeros(3), batch_size=1)
    with pytest.raises(ValueError, match="reason"):
        CallFailure("oops")


class RaisesOnNegative(Reward):
    name = "raises"

    def __init__(self) -> None:
        self.grad_enabled: list[bool] = []

    def evaluate(self, x: torch.Tensor) -> RewardBatch:
        self.grad_enabled.append(torch.is_grad_enabled())
        if bool((x[:, 0] < 0).any()):
            raise ValueError("cannot score a negative sample")
        r = x.sum(-1)
        valid = x[:, 0] != 3
        return RewardBatch(r, valid, ["" if v else "timeout" for v in valid.tolist()])


def nan_on_two(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x[:, 0] == 2, torch.full_like(x[:, 0], float("nan")), x.sum(-1))


def test_in_process_reward_with_bisection_reasons_and_no_grad():
    reward, x = RaisesOnNegative(), samples(8, bad=[5])
    result = evaluate_reward_robust(reward, x, batch_size=4, max_in_flight=2, retries=1)
    assert result.errors == ["", "", "timeout", "", "", "exception", "", ""]
    np.testing.assert_array_equal(result.rewards[result.valid], x[result.valid].sum(1))
    assert not any(reward.grad_enabled)  # grad mode is per thread; the adapter turns it off
    batch = result.to_reward_batch()
    assert batch.errors == result.errors and batch.attempts.dtype == torch.int64
    assert batch.valid.tolist() == result.valid.tolist()


def test_function_reward_nan_and_detailed_rewards_are_used_as_is():
    result = evaluate_reward_robust(FunctionReward(nan_on_two), samples(3), batch_size=2)
    assert result.errors == ["", "nan", ""] and result.to_reward_batch().errors == ["", "nan", ""]
    sentinel = RobustResult(np.zeros(1), np.ones(1, bool), [""], np.ones(1, np.int64), np.zeros(1), 1)

    class Detailed(Reward):
        def evaluate_detailed(self, x: np.ndarray) -> RobustResult:
            return sentinel

    assert evaluate_reward_robust(Detailed(), samples(1), batch_size=1) is sentinel
    assert sentinel.to_reward_batch().errors is None
