"""rewards.simulator.Command under fault injection, and the shipped epidemic simulator."""

from __future__ import annotations

import os
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from rewards.examples.epidemic import rewards_of
from rewards.simulator import Command
from rewards.toy2d import sample_base

FAULT_SCRIPT = str(Path(__file__).with_name("fault_simulator.py"))
REPO = Path(__file__).resolve().parents[2]
GOOD, CRASH, HANG, GARBAGE, WRONG_SHAPE, NAN, SIGKILL, SLOW, FLAKY, NO_OUTPUT = range(10)


@pytest.fixture
def fault_command(tmp_path):
    """Factory of Commands running fault_simulator.py; ``.log`` lists one line of codes per call."""

    def make(**kwargs) -> Command:
        kwargs.setdefault("backoff_s", 0.0)
        env = {"FAULT_LOG": str(tmp_path / "calls.log"), "FAULT_DIR": str(tmp_path)}
        return Command(["{python}", "-S", FAULT_SCRIPT, "{input}", "{output}"], env=env, **kwargs)

    make.log = tmp_path / "calls.log"
    make.dir = tmp_path
    return make


def coded(codes: list[int]) -> np.ndarray:
    """(n, 2) samples (code, value); a good sample's reward is its value 0.5 + i."""
    return np.stack([np.asarray(codes, dtype=float), 0.5 + np.arange(len(codes))], 1)


def logged_calls(log: Path) -> list[list[int]]:
    return [[int(c) for c in line.split()] for line in log.read_text().splitlines()] if log.exists() else []


def is_dead(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"  # a zombie waiting for init counts as dead
    except FileNotFoundError:
        return True


def test_mixed_faults_are_isolated_and_counted(fault_command):
    codes = [GOOD, GOOD, CRASH, GOOD, GOOD, NAN, GOOD, GOOD]
    codes += [GOOD, GARBAGE, GOOD, GOOD, WRONG_SHAPE, GOOD, GOOD, SIGKILL]
    codes += [HANG, GOOD, GOOD, NO_OUTPUT, GOOD, GOOD, FLAKY, GOOD]
    command = fault_command(batch_size=8, max_in_flight=2, retries=1, timeout_s=0.5)
    x = coded(codes)
    start = time.perf_counter()
    result = command.evaluate_detailed(x)
    wall = time.perf_counter() - start
    expected = {CRASH: "crash", SIGKILL: "crash", NAN: "nan", GARBAGE: "malformed", WRONG_SHAPE: "malformed"}
    expected |= {NO_OUTPUT: "malformed", HANG: "timeout"}
    assert result.errors == [expected.get(c, "") for c in codes]
    assert result.failure_counts() == {"crash": 2, "nan": 1, "malformed": 3, "timeout": 1}
    assert int(result.valid.sum()) + int((~result.valid).sum()) == len(codes)
    good = ~np.isin(codes, list(expected))
    np.testing.assert_array_equal(result.rewards[good], x[good, 1])  # no valid result lost
    calls = logged_calls(fault_command.log)
    assert result.n_calls == len(calls) and result.attempts.sum() == sum(map(len, calls))
    assert result.attempts[codes.index(HANG)] == 4  # 8 -> 4 -> 2 -> 1, then no retry left
    assert wall < 20  # timeouts are enforced: a hanging call would sleep 60 s


def test_timeout_kills_the_process_group_and_is_bounded(fault_command):
    command = fault_command(batch_size=1, retries=1, timeout_s=0.5)
    start = time.perf_counter()
    result = command.evaluate_detailed(coded([HANG, GOOD]))
    wall = time.perf_counter() - start
    assert result.errors == ["timeout", ""] and result.attempts.tolist() == [2, 1]
    assert 1.0 <= wall < 20  # two timed-out calls of 0.5 s; the hang itself would last 60 s
    grandchildren = [int(p.read_text()) for p in fault_command.dir.glob("grandchild-*")]
    assert len(grandchildren) == 2
    deadline = time.monotonic() + 2.0
    while not all(map(is_dead, grandchildren)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(map(is_dead, grandchildren))


def test_retries_make_calls_and_flaky_samples_recover(fault_command):
    result = fault_command(batch_size=1, retries=2).evaluate_detailed(coded([CRASH]))
    assert result.errors == ["crash"] and result.attempts.tolist() == [3]
    assert logged_calls(fault_command.log) == [[CRASH]] * 3
    result = fault_command(batch_size=1, retries=1).evaluate_detailed(coded([FLAKY]))
    assert result.valid.tolist() == [True] and result.attempts.tolist() == [2]
    assert result.rewards.tolist() == [0.5]


def test_flaky_sample_without_retries_is_lost_alone(fault_command):
    result = fault_command(batch_size=1, retries=0).evaluate_detailed(coded([FLAKY, GOOD]))
    assert result.errors == ["crash", ""]


def test_calls_in_flight_overlap(fault_command):
    command = fault_command(batch_size=1, max_in_flight=4)
    start = time.perf_counter()
    result = command.evaluate_detailed(coded([SLOW] * 8))
    wall = time.perf_counter() - start
    assert result.valid.all() and result.n_calls == 8
    # 8 calls of 0.2 s: 1.6 s one at a time, 0.4 s four at a time; under 1.2 s only if calls overlapped
    assert wall < 1.2


def test_temporary_directories_are_removed(fault_command, tmp_path):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    command = fault_command(batch_size=2, timeout_s=0.3, retries=0, scratch_dir=str(scratch))
    command.evaluate_detailed(coded([GOOD, GARBAGE, HANG, GOOD]))
    assert list(scratch.iterdir()) == []
    # the calls did work in scratch_dir: a command that records where its input was
    seen = tmp_path / "seen.txt"
    script = ("import sys, numpy as np; open(sys.argv[3], 'a').write(sys.argv[1] + '\\n'); "
              "np.save(sys.argv[2], np.load(sys.argv[1]).sum(1))")
    where = Command(["{python}", "-c", script, "{input}", "{output}", str(seen)], batch_size=2, scratch_dir=str(scratch))
    assert where.evaluate_detailed(np.ones((4, 2))).valid.all()
    dirs = {Path(line).parent.parent for line in seen.read_text().split()}
    assert dirs == {scratch} and list(scratch.iterdir()) == []
    with pytest.raises(ValueError, match="scratch_dir"):
        Command(["{python}", "-c", "", "{input}", "{output}"], scratch_dir=str(tmp_path / "nowhere"))


def test_evaluate_returns_a_reward_batch_and_pickles(fault_command):
    command = fault_command(batch_size=2, retries=0)
    clone = pickle.loads(pickle.dumps(command))
    assert clone.argv == command.argv and clone.env == command.env and not clone.differentiable
    batch = clone.evaluate(torch.from_numpy(coded([GOOD, NAN, GOOD])))
    assert batch.valid.tolist() == [True, False, True] and batch.errors == ["", "nan", ""]
    assert batch.rewards.dtype == torch.float64 and batch.attempts.dtype == torch.int64
    assert Command(command.argv, env={"N": 2.5}).env == {"N": "2.5"}
    all_good = clone.evaluate(torch.from_numpy(coded([GOOD])))
    assert all_good.errors is None and all_good.rewards.tolist() == [0.5]


def test_argv_placeholders_and_a_missing_program():
    command = Command(["{python}", "-c", "pass", "--in={input}", "{output}"])
    assert command.resolve_argv("a.npy", "b.npy")[1:] == ["-c", "pass", "--in=a.npy", "b.npy"]
    assert os.path.isabs(command.resolve_argv("a", "b")[0])
    assert command.name.startswith("command:") and command.version == "1"
    gone = Command(["/nonexistent/simulator", "{input}", "{output}"], retries=0, batch_size=1)
    assert gone.evaluate_detailed(np.zeros((1, 2))).errors == ["crash"]


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"argv": "python sim.py {input} {output}"}, "argv"),
        ({"argv": []}, "argv"),
        ({"argv": ["{python}", "sim.py", "{input}"]}, "argv"),
        ({"argv": ["{python}", 3, "{input}", "{output}"]}, "argv"),
        ({"argv": ["no-such-program-xyz", "{input}", "{output}"]}, "argv"),
        ({"timeout_s": 0}, "timeout_s"),
        ({"retries": -1}, "retries"),
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": 2.5}, "batch_size"),
        ({"max_in_flight": 0}, "max_in_flight"),
        ({"backoff_s": -0.1}, "backoff_s"),
        ({"name": ""}, "name"),
        ({"env": {"A": None}}, "env"),
        ({"env": ["A"]}, "env"),
    ],
)
def test_bad_kwargs_name_the_kwarg(kwargs, name):
    kwargs = {"argv": ["{python}", "sim.py", "{input}", "{output}"], **kwargs}
    with pytest.raises(ValueError, match=name):
        Command(**kwargs)


def test_epidemic_is_deterministic_in_a_sensible_range_and_takes_tens_of_ms():
    x = sample_base(24, seed=7)
    start = time.perf_counter()
    rewards = rewards_of(x)
    per_sample = (time.perf_counter() - start) / len(x)
    np.testing.assert_array_equal(rewards, rewards_of(x))
    assert np.isfinite(rewards).all() and (rewards < -4).all() and (rewards > -16).all()
    assert rewards.std() > 0.3  # the policy matters
    assert rewards_of(x, seed=1).tolist() != rewards.tolist()  # the seed enters every run
    assert 0.003 < per_sample < 0.25, per_sample


def test_epidemic_through_command_matches_in_process_and_injects_faults_only_on_request():
    x = sample_base(8, seed=3)
    x[5] = [4.0, 0.0]  # an "odd" input: ||x|| > 3.5
    argv = ["{python}", "-m", "rewards.examples.epidemic", "{input}", "{output}"]
    plain = Command(argv, batch_size=8, timeout_s=60).evaluate_detailed(x)
    assert plain.valid.all() and plain.n_calls == 1
    np.testing.assert_array_equal(plain.rewards, rewards_of(x))
    faulty = Command(argv, batch_size=8, retries=0, env={"TFFT_EPIDEMIC_FAULT": "crash"}).evaluate_detailed(x)
    assert faulty.errors == ["crash" if i == 5 else "" for i in range(8)]
    np.testing.assert_array_equal(faulty.rewards[faulty.valid], plain.rewards[faulty.valid])


def test_epidemic_config_loads():
    from pipelines.config import load_config
    from rewards.base import load_reward

    cfg = load_config(REPO / "tune_configs" / "epidemic_left.yaml")
    assert cfg.objective.side == "left" and cfg.finetune.solver == "weighted"
    reward = load_reward(cfg.reward.target, cfg.reward.kwargs)
    assert isinstance(reward, Command) and not reward.differentiable


def test_epidemic_nan_mode_marks_only_odd_samples(tmp_path, set_env):
    from rewards.examples.epidemic import main

    x = np.array([[0.0, 0.0], [3.0, 3.0], [-1.0, 0.5]])
    np.save(tmp_path / "in.npy", x)
    set_env(TFFT_EPIDEMIC_FAULT="nan")
    set_env(TFFT_EPIDEMIC_FAULT_RADIUS="3")
    assert main([str(tmp_path / "in.npy"), str(tmp_path / "out.npy")]) == 0
    out = np.load(tmp_path / "out.npy")
    assert np.isnan(out).tolist() == [False, True, False]
    np.testing.assert_array_equal(out[[0, 2]], rewards_of(x[[0, 2]]))


def test_cache_identity_ignores_operational_kwargs():
    """Timeouts, retries and batching do not change reward values, so they stay out of the cache key."""
    from pipelines.reward_cache import reward_identity
    from rewards.simulator import Command

    argv = ["{python}", "-c", "pass", "{input}", "{output}"]
    a = Command(argv=argv, timeout_s=5, retries=1, batch_size=4)
    b = Command(argv=argv, timeout_s=50, retries=3, batch_size=16, max_in_flight=4)
    c = Command(argv=argv + ["--other"])
    key = lambda r: reward_identity("rewards.simulator:Command", r.value_kwargs(), r.version)  # noqa: E731
    assert key(a) == key(b) != key(c)
