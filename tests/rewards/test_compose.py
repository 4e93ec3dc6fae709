"""rewards.compose.WeightedSum: values, validity, gradients, robust terms, cache identity, kwargs, pickling."""

from __future__ import annotations

import pickle
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.reward_cache import reward_identity
from rewards.base import RewardBatch, load_reward
from rewards.compose import WeightedSum
from rewards.examples.http_server import reward_of, serve
from rewards.robust import evaluate_reward_robust
from rewards.simulator import Command
from rewards.toy2d import distance_penalty, tail_reward

FAULT_SCRIPT = str(Path(__file__).with_name("fault_simulator.py"))
TAIL = {"target": "rewards.toy2d:TailReward2D"}
DIST = {"target": "rewards.toy2d:distance_penalty"}

# Terms a user would write, in a module of their own (importable by path, picklable by reference).
USER_TERMS = '''
import torch
from rewards.base import Reward, RewardBatch

def nan_below(x, *, level=-1.0):
    """x1, NaN where x1 < level (reason 'nan')."""
    r = x[:, 1] * 1.0
    return torch.where(x[:, 1] < level, torch.full_like(r, float("nan")), r)

class RaisesOnFar(Reward):
    """x0 + x1; raises for any chunk holding a sample with x0 < -3 (no gradients)."""
    name = "raises_on_far"
    def evaluate(self, x):
        if bool((x[:, 0] < -3).any()):
            raise RuntimeError("far sample in the chunk")
        return RewardBatch(x.sum(-1).to(torch.float64), torch.ones(len(x), dtype=torch.bool))
'''


@pytest.fixture(scope="module", autouse=True)
def user_terms(tmp_path_factory):
    root = tmp_path_factory.mktemp("user_terms")
    (root / "compose_user_terms.py").write_text(textwrap.dedent(USER_TERMS))
    sys.path.insert(0, str(root))
    yield
    sys.path.remove(str(root))
    sys.modules.pop("compose_user_terms", None)


def points(n: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(scale=2.0, size=(n, 2))


def weighted(*terms: dict) -> WeightedSum:
    return WeightedSum(list(terms))


def test_values_are_the_weighted_sum_of_the_terms_own_values():
    ws = weighted({**TAIL, "kwargs": {"peak_height": 5.0}, "weight": 1.5}, {**DIST, "weight": -0.25, "name": "dist"})
    x = torch.from_numpy(points())
    r1, r2 = tail_reward(x, peak_height=5.0), distance_penalty(x)
    want = 1.5 * r1 + -0.25 * r2
    for out in (ws.evaluate(x), ws.evaluate_detailed(x.numpy()).to_reward_batch()):
        assert torch.equal(out.rewards, want) and bool(out.valid.all()) and out.errors is None
        assert list(out.terms) == ["TailReward2D", "dist"]
        assert torch.equal(out.terms["TailReward2D"], r1) and torch.equal(out.terms["dist"], r2)  # unweighted
    assert ws.term_names == ("TailReward2D", "dist") and ws.term_weights == {"TailReward2D": 1.5, "dist": -0.25}


@pytest.mark.parametrize("order", ["crash_first", "nan_first"])
def test_validity_is_the_conjunction_with_the_first_failing_terms_reason(order):
    crash = {**TAIL, "kwargs": {"crash_radius": 1.0}}  # 'crash' within 1 of (-2.5, -1.5)
    below = {"target": "compose_user_terms:nan_below"}  # 'nan' where x1 < -1
    ws = weighted(crash, below) if order == "crash_first" else weighted(below, crash)
    x = np.array([[0.0, 0.0], [-2.5, -1.5], [2.0, -2.0], [-2.5, -0.9], [np.nan, 0.0]])
    both = "crash" if order == "crash_first" else "nan"
    want = ["", both, "nan", "crash", "nan"]
    detailed = ws.evaluate_detailed(x)
    batch = ws.evaluate(torch.from_numpy(x))
    assert detailed.errors == want and batch.errors == want
    np.testing.assert_array_equal(detailed.valid, [True, False, False, False, False])
    assert np.isnan(detailed.rewards[1:]).all() and batch.rewards[1:].isnan().all()
    tail = detailed.terms["TailReward2D"]  # a term keeps its value where only another term failed
    assert np.isfinite(tail[[0, 2]]).all() and np.isnan(tail[[1, 3, 4]]).all()
    np.testing.assert_array_equal(detailed.terms["nan_below"][[0, 3]], [0.0, -0.9])
    assert detailed.attempts.tolist() == [2] * 5  # one call of each term


def test_gradient_is_the_weighted_sum_of_the_terms_gradients():
    ws = weighted({**TAIL, "kwargs": {"crash_radius": 0.5}, "weight": 0.7}, {**DIST, "weight": 0.3})
    assert ws.differentiable
    x = torch.from_numpy(points(32, seed=1))
    x[0] = torch.tensor([-2.5, -1.5], dtype=torch.float64)  # crashes (as may a few others): their rows are zero
    out, grad = ws.evaluate_with_grad(x)
    xr = x.clone().requires_grad_(True)
    (auto,) = torch.autograd.grad((0.7 * tail_reward(xr) + 0.3 * distance_penalty(xr)).sum(), xr)
    ok = out.valid
    assert out.errors[0] == "crash" and 1 <= int((~ok).sum()) < 5
    assert torch.equal(grad[~ok], torch.zeros_like(grad[~ok]))
    torch.testing.assert_close(grad[ok], auto[ok], rtol=1e-12, atol=1e-12)
    assert torch.equal(out.rewards[ok], ws.evaluate(x).rewards[ok])


def test_not_differentiable_when_any_term_is_not_and_the_pipeline_picks_the_weighted_solver():
    from pipelines.config import from_dict
    from pipelines.stages.preflight import resolve_plan

    terms = [TAIL, {"target": "compose_user_terms:RaisesOnFar", "weight": 0.1}]
    ws = WeightedSum(terms)
    assert not ws.differentiable
    with pytest.raises(TypeError, match="RaisesOnFar"):
        ws.evaluate_with_grad(torch.zeros(2, 2))
    cfg = from_dict({"reward": {"target": "rewards.compose:WeightedSum", "kwargs": {"terms": terms}}})
    assert resolve_plan(cfg).solver == "weighted"
    cfg = from_dict({"reward": {"target": "rewards.compose:WeightedSum", "kwargs": {"terms": [TAIL, DIST]}}})
    assert resolve_plan(cfg).solver == "adjoint"


def test_a_term_raising_on_a_chunk_loses_only_its_own_samples_with_the_pools_settings():
    ws = weighted(TAIL, {"target": "compose_user_terms:RaisesOnFar"})
    x = points(8, seed=2)
    x[:, 0] = np.abs(x[:, 0])
    x[5, 0] = -4.0  # makes RaisesOnFar raise on every chunk that holds it
    res = evaluate_reward_robust(ws, x, batch_size=4, retries=0, backoff_s=0.0)
    assert res.errors == ["exception" if i == 5 else "" for i in range(8)]
    assert np.isfinite(res.terms["TailReward2D"]).all()  # the other term keeps sample 5's value
    assert np.isnan(res.terms["RaisesOnFar"][5]) and np.isfinite(np.delete(res.terms["RaisesOnFar"], 5)).all()
    # the pool's settings reached the in-process term: chunks of 4, the bad one bisected down to sample 5
    # ([4..7] -> [4, 5] and [6, 7] -> [4] and [5]), plus one call of the other term
    assert res.attempts.tolist() == [2, 2, 2, 2, 4, 4, 3, 3]


def test_a_term_failing_as_a_whole_keeps_the_other_terms_values(set_env):
    set_env(TFFT_TEST_COMPOSE_UNSET=None)
    ws = weighted(TAIL, {"target": "rewards.http:Endpoint", "name": "server",
                         "kwargs": {"url": "http://127.0.0.1:9", "token_env": "TFFT_TEST_COMPOSE_UNSET"}})
    x = points(6)
    res = ws.evaluate_detailed(x)  # the endpoint raises ValueError (token missing) before any request
    assert res.errors == ["exception"] * 6 and not res.valid.any()
    np.testing.assert_array_equal(res.terms["TailReward2D"], tail_reward(torch.from_numpy(x)).numpy())
    assert np.isnan(res.terms["server"]).all()


def test_a_command_term_keeps_its_own_robust_evaluation_and_every_sample_is_accounted_once(tmp_path):
    codes = [0, 0, 1, 0, 0, 5, 0, 0]  # 1: the call crashes; 5: NaN for this sample (fault_simulator.py)
    x = np.stack([np.asarray(codes, dtype=float), 0.5 + np.arange(len(codes))], 1)
    command = {"argv": ["{python}", "-S", FAULT_SCRIPT, "{input}", "{output}"], "batch_size": 4, "retries": 0,
               "backoff_s": 0.0, "env": {"FAULT_DIR": str(tmp_path)}}
    ws = weighted({"target": "rewards.simulator:Command", "kwargs": command, "name": "sim"}, {**DIST, "weight": 2.0})
    res = evaluate_reward_robust(ws, x, batch_size=1)  # the pool's batch_size: not the command's
    alone = Command(**command).evaluate_detailed(x)
    assert res.errors == alone.errors == ["", "", "crash", "", "", "nan", "", ""]
    np.testing.assert_array_equal(res.attempts, alone.attempts + 1)  # + one call of the in-process term
    np.testing.assert_array_equal(res.terms["sim"], alone.rewards)
    want = alone.rewards + 2.0 * distance_penalty(torch.from_numpy(x)).numpy()
    np.testing.assert_array_equal(res.rewards, want)
    assert res.n_calls == alone.n_calls + 8 and len(res.rewards) == len(x)


def test_an_http_term_combines_with_an_in_process_term():
    server, url = serve()
    try:
        ws = weighted({"target": "rewards.http:Endpoint", "kwargs": {"url": url, "batch_size": 3}, "weight": 0.5},
                      {**TAIL, "weight": 1.0})
        x = points(10, seed=3)
        x[4, 1] = np.inf  # never sent: 'nan'
        res = ws.evaluate_detailed(x)
    finally:
        server.shutdown()
    served = np.array([reward_of(row) if np.isfinite(row).all() else np.nan for row in x.tolist()])
    np.testing.assert_array_equal(res.terms["Endpoint"], served)
    assert res.errors == ["nan" if i == 4 else "" for i in range(10)]
    keep = res.valid
    np.testing.assert_array_equal(res.rewards[keep], 0.5 * served[keep] + tail_reward(torch.from_numpy(x[keep])).numpy())


def _identity(terms: list[dict], version: str = "1") -> str:
    ws = WeightedSum(terms, version=version)
    return reward_identity("rewards.compose:WeightedSum", ws.value_kwargs(), ws.version)


def test_cache_identity_follows_terms_and_weights_not_timeouts():
    command = {"target": "rewards.simulator:Command",
               "kwargs": {"argv": ["{python}", "-S", FAULT_SCRIPT, "{input}", "{output}"], "timeout_s": 5}}
    base = _identity([TAIL, {**command, "weight": 0.5}])
    assert base == _identity([TAIL, {**command, "weight": 0.5}])
    slower = {**command, "kwargs": {**command["kwargs"], "timeout_s": 50, "batch_size": 2, "max_in_flight": 3}}
    assert _identity([TAIL, {**slower, "weight": 0.5}]) == base  # call settings do not change values
    changed = [
        _identity([TAIL, {**command, "weight": 0.25}]),
        _identity([{**TAIL, "kwargs": {"peak_height": 3.0}}, {**command, "weight": 0.5}]),
        _identity([TAIL, {**command, "weight": 0.5, "name": "sim"}]),
        _identity([TAIL, {**command, "weight": 0.5}, DIST]),
        _identity([{**command, "weight": 0.5}, TAIL]),
        _identity([TAIL, {**command, "weight": 0.5}], version="2"),
    ]
    assert len({base, *changed}) == 1 + len(changed)


@pytest.mark.parametrize(
    "terms, match",
    [
        ([], r"terms must be a non-empty list"),
        ({"target": "rewards.toy2d:TailReward2D"}, r"terms must be a non-empty list"),
        ([TAIL, "rewards.toy2d:TailReward2D"], r"terms\[1\] must be a mapping"),
        ([TAIL, {"weight": 1.0}], r"terms\[1\] lacks 'target'"),
        ([{**TAIL, "wieght": 1.0}], r"terms\[0\] has unknown key\(s\) 'wieght'"),
        ([{**TAIL, "weight": "heavy"}], r"terms\[0\]\.weight must be a finite number"),
        ([TAIL, {**DIST, "weight": float("nan")}], r"terms\[1\]\.weight must be a finite number"),
        ([{**TAIL, "weight": True}], r"terms\[0\]\.weight must be a finite number"),
        ([{**TAIL, "name": "a"}, {**DIST, "name": "a"}], r"terms\[1\]\.name 'a' repeats the name of terms\[0\]"),
        ([{**TAIL, "name": "a.b"}], r"terms\[0\]\.name must be"),
        ([TAIL, {**TAIL, "kwargs": {"peak_hieght": 1}}], r"terms\[1\]\.target: .*peak_hieght"),
        ([{"target": "rewards.toy2d"}], r"terms\[0\]\.target must be an import path"),
        ([{**TAIL, "kwargs": [1, 2]}], r"terms\[0\]\.kwargs must be a mapping"),
    ],
)
def test_bad_kwargs_name_the_term_and_the_key(terms, match):
    with pytest.raises(ValueError, match=match):
        WeightedSum(terms)


def test_loads_by_import_path_with_unique_default_names_and_pickles():
    ws = load_reward("rewards.compose:WeightedSum",
                     {"terms": [TAIL, {**TAIL, "weight": 2}, {**DIST, "name": "TailReward2D_2"}], "version": "3"})
    assert isinstance(ws, WeightedSum) and ws.version == "3"
    assert ws.term_names == ("TailReward2D", "TailReward2D_3", "TailReward2D_2")  # explicit names first
    back = pickle.loads(pickle.dumps(ws))
    x = torch.from_numpy(points(16))
    a, b = ws.evaluate(x), back.evaluate(x)
    assert isinstance(b, RewardBatch) and torch.equal(a.rewards, b.rewards) and back.term_names == ws.term_names
    assert ws.name == "weighted_sum:TailReward2D+TailReward2D_3+TailReward2D_2"
