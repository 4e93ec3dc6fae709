"""Conditions end to end through ``tfft run``: a class-conditional Gaussian base against its closed form.

Condition c in {"a", "b"} has base law N(mu_c, I) in 2-D, mu_a = (-1, 0), mu_b = (+1, 0); the user's model is
the exact conditional velocity plus a zero-initialised correction (``user_flow_model.conditional_gaussian_flow``),
``pretrain.steps: 0``, and the reward is r(x) = x_0, so under condition c the reward is N(m_c, 1), m_c = -1, +1.
The target of each condition is the CVaR dual tilt p*_c ∝ N(m_c, 1) exp(g_c(r) / gamma), g_c = (r - eta*_c)_+ /
alpha (right) or -(eta*_c - r)_+ / alpha (left), with eta*_c the minimiser (right) or maximiser (left) of
J(eta) = eta + gamma log E exp(g / gamma); its CVaR_alpha is computed here by quadrature (`closed_form_cvar`).
The session's shared local Ray (conftest.py); each run fine-tunes for a few seconds (weighted solver, one worker).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import integrate, optimize, stats

from pipelines.bankio import read_bank
from pipelines.cli import main
from tfft.objective import Tilt

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ALPHA, GAMMA = 0.1, 8.0
MEANS = {"a": -1.0, "b": 1.0}
STAT_KEYS = {"n", "n_valid", "mean", "cvar_right", "cvar_left"}
LEVELS = {"0.05", "0.1", "0.2"}
PER_BANK, PER_EVAL = 8000, 4000

CONFIG = f"""
data:
  source: user_flow_model:conditional_source
  kwargs: {{means: {{a: [-1.0, 0.0], b: [1.0, 0.0]}}}}
  conditions: [a, b]
model:
  target: user_flow_model:conditional_gaussian_flow
  kwargs: {{means: {{a: [-1.0, 0.0], b: [1.0, 0.0]}}}}
  sample_shape: [2, 1]
pretrain: {{steps: 0, n_samples: 16}}
reward: {{target: user_flow_model:first_coordinate_given}}
objective: {{kind: cvar, alpha: {ALPHA}, kl_weight: {GAMMA}}}
sampler: {{steps: 20}}
bank: {{size: {PER_BANK}, shard_size: {PER_BANK}}}
eval: {{size: {PER_EVAL}}}
finetune: {{solver: weighted, steps: 1200, batch_size: 512, lr: 0.003, num_workers: 1, log_every: 200,
           checkpoint_every: 1200, backend: local}}
"""


def closed_form_cvar(m: float, side: str, alpha: float = ALPHA, gamma: float = GAMMA) -> float:
    """CVaR_alpha of r under the exact CVaR-dual tilt of r ~ N(m, 1), by quadrature (module docstring)."""
    lo, hi = m - 12.0, m + 12.0

    def g(r, eta):
        return np.maximum(r - eta, 0.0) / alpha if side == "right" else -np.maximum(eta - r, 0.0) / alpha

    def z(eta):
        return integrate.quad(lambda r: stats.norm.pdf(r - m) * np.exp(g(r, eta) / gamma), lo, hi, points=[eta],
                              limit=200)[0]

    def j(eta):
        return eta + gamma * np.log(z(eta))

    if side == "right":  # J_R is convex
        eta = optimize.minimize_scalar(j, bounds=(m - 5, m + 10), method="bounded", options={"xatol": 1e-9}).x
    else:  # J_L need not be concave: a grid, then a local refinement
        grid = np.linspace(m - 8, m + 3, 221)
        start = grid[int(np.argmax([j(e) for e in grid]))]
        eta = optimize.minimize_scalar(lambda e: -j(e), bounds=(start - 0.06, start + 0.06), method="bounded",
                                       options={"xatol": 1e-9}).x
    total = z(eta)

    def density(r):
        return stats.norm.pdf(r - m) * np.exp(g(r, eta) / gamma) / total

    if side == "right":
        q = optimize.brentq(lambda q: integrate.quad(density, q, hi, limit=200)[0] - alpha, lo, hi)
        return integrate.quad(lambda r: r * density(r), q, hi, limit=200)[0] / alpha
    q = optimize.brentq(lambda q: integrate.quad(density, lo, q, limit=200)[0] - alpha, lo, hi)
    return integrate.quad(lambda r: r * density(r), lo, q, limit=200)[0] / alpha


def test_closed_form_matches_the_design_notes():
    """DESIGN.md section 5: N(0, 1), r = x, right, alpha 0.1, gamma 3 has the exact target R-CVaR(0.1) 3.602."""
    assert closed_form_cvar(0.0, "right", gamma=3.0) == pytest.approx(3.602, abs=2e-3)
    assert closed_form_cvar(1.0, "left") == pytest.approx(closed_form_cvar(0.0, "left") + 1.0, abs=1e-6)


@pytest.fixture(scope="module")
def env(tmp_path_factory, local_ray):
    """The session's shared Ray (conftest.py), whose workers see the user's model module, and the run's config."""
    root = tmp_path_factory.mktemp("cond")
    shutil.copy(Path(__file__).with_name("user_flow_model.py"), local_ray)
    (root / "cond.yaml").write_text(CONFIG)
    common = [f"tracking.uri=sqlite:///{root / 'mlflow.db'}", f"bank.cache_dir={root / 'rewards'}"]
    return {"root": root, "config": str(root / "cond.yaml"), "common": common, "uri": f"sqlite:///{root / 'mlflow.db'}"}


def _run(env, name, *overrides):
    out_dir = env["root"] / name
    assert main(["run", env["config"], "--out", str(out_dir), *overrides, *env["common"]]) == 0
    return out_dir, json.loads((out_dir / "summary.json").read_text())


@pytest.fixture(scope="module")
def runs(env):
    return {side: _run(env, side, f"objective.side={side}") for side in ("right", "left")}


def _check_blocks(summary):
    assert set(summary["per_condition"]) == {"a", "b"}
    for value, block in summary["per_condition"].items():
        for name in ("base", "finetuned", "target"):
            assert STAT_KEYS <= set(block[name])
            assert set(block[name]["cvar_right"]) == LEVELS and set(block[name]["cvar_left"]) == LEVELS
        assert block["base"]["n"] == PER_BANK and block["finetuned"]["n"] == PER_EVAL
        assert {"eta", "value", "tail_mass", "ess", "active_fraction"} <= set(block["threshold"])
    for name in ("base", "finetuned", "target"):  # the pooled blocks stay where they are
        assert STAT_KEYS <= set(summary[name])
    assert summary["base"]["n"] == 2 * PER_BANK and summary["finetuned"]["n"] == 2 * PER_EVAL


def test_each_condition_reaches_its_closed_form_target(runs):
    for side, (out_dir, summary) in runs.items():
        _check_blocks(summary)
        etas = {v: b["threshold"]["eta"] for v, b in summary["per_condition"].items()}
        assert etas["b"] - etas["a"] == pytest.approx(2.0, abs=0.15)  # a threshold per condition
        assert summary["objective"] == {"kind": "cvar", "eta": [etas["a"], etas["b"]], "side": side, "alpha": ALPHA,
                                        "kl_weight": GAMMA}
        blob = torch.load(out_dir / "checkpoint" / "model.pt", map_location="cpu", weights_only=True)
        assert Tilt.from_dict(blob["objective"]) == Tilt((etas["a"], etas["b"]), side, ALPHA, GAMMA)
        for value, m in MEANS.items():
            block = summary["per_condition"][value]
            want = closed_form_cvar(m, side)
            got = block["finetuned"][f"cvar_{side}"]["0.1"]
            base = block["base"][f"cvar_{side}"]["0.1"]
            assert abs(got - want) <= 0.15, (side, value, got, want, base)
            assert abs(base - want) > 0.3  # the base is far from the target: the test can fail
        # the evaluation check: the mean over conditions of each condition's own statistic, the model kept
        check = summary["guard"]["evaluation"]
        per = [summary["per_condition"][v]["finetuned"][f"cvar_{side}"]["0.1"] for v in ("a", "b")]
        assert check["finetuned_per_condition"] == pytest.approx(per, abs=0.02)
        assert check["finetuned"] == pytest.approx(np.mean(check["finetuned_per_condition"]), abs=1e-12)
        assert not check["worse"] and check["finetuned"] > check["base"]
        # the pooled target is the mixture of the per-condition tilts
        pooled = summary["target"]["mean"]
        assert pooled == pytest.approx(np.mean([b["target"]["mean"] for b in summary["per_condition"].values()]),
                                       abs=1e-9)
        bank = read_bank(out_dir / "bank_base.parquet")
        assert bank.conditions == ["a", "b"] and np.bincount(bank.cond).tolist() == [PER_BANK, PER_BANK]
        rewards = {c: bank.reward[bank.cond == k] for k, c in enumerate(bank.conditions)}
        assert np.mean(rewards["a"]) == pytest.approx(-1.0, abs=0.05)  # rows sampled with their own condition
        assert np.mean(rewards["b"]) == pytest.approx(1.0, abs=0.05)


def test_metrics_per_condition_in_mlflow(env, runs):
    import mlflow

    client = mlflow.tracking.MlflowClient(env["uri"])
    experiment = client.get_experiment_by_name("tfft")
    run = client.search_runs([experiment.experiment_id], filter_string="attributes.run_name = 'right'")[0]
    keys = set(run.data.metrics)
    assert {"cond/a/finetuned.cvar_right_0.1", "cond/b/target.mean", "cond/a/threshold.eta", "finetuned.mean"} <= keys


def test_pooled_threshold_still_reports_per_condition(env, runs):
    """objective.per_condition false: one eta* on the pooled bank, every statistic still per condition. The adjoint
    solver (trajectories with uniformly drawn conditions through Ray Train) at smoke size."""
    # 20 steps leave the model near its base, so the evaluation check's verdict would be noise: recorded, not acted on
    _, summary = _run(env, "pooled", "objective.per_condition=false", "finetune.solver=adjoint",
                      "finetune.guard=false", "finetune.steps=20", "finetune.batch_size=128", f"bank.size={PER_BANK // 4}",
                      f"eval.size={PER_EVAL // 4}", f"bank.shard_size={PER_BANK // 4}")
    assert summary["solver"] == "adjoint"
    eta = summary["threshold"]["eta"]
    assert isinstance(summary["objective"]["eta"], float) and summary["objective"]["eta"] == eta
    assert {b["threshold"]["eta"] for b in summary["per_condition"].values()} == {eta}
    assert set(summary["per_condition"]) == {"a", "b"}
    for block in summary["per_condition"].values():
        assert STAT_KEYS <= set(block["finetuned"]) and block["finetuned"]["n"] == PER_EVAL // 4
    check = summary["guard"]["evaluation"]  # one pooled threshold: the pooled statistic
    assert check["base_per_condition"] == [] and check["base"] == pytest.approx(summary["base"]["cvar_right"]["0.1"],
                                                                                 abs=0.05)
