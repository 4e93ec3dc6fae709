"""`tfft.objective.Tilt`: hand-computed values, brute force, and the functions it wraps."""

from __future__ import annotations

import json
import math
import pickle

import numpy as np
import pytest
import torch
from scipy.stats import norm

from tfft.objective import Tilt
from tfft.pseudo import pseudo_reward_signal
from tfft.bracket import TailMeasurement
from tfft.refine import refine_threshold
from tfft.tail import cvar, var
from tfft.interval import target_interval
from tfft.target import target_summary, tilt_weights

RIGHT = Tilt(1.0, "right", 0.1, 1.0)
LEFT = Tilt(-1.0, "left", 0.1, 1.0)
MEAN = Tilt.mean(1.0)


@pytest.mark.parametrize(
    "args, name",
    [((0.0, "up", 0.1, 1.0), "side"), ((0.0, "right", 0.0, 1.0), "alpha"), ((0.0, "right", 1.5, 1.0), "alpha"),
     ((0.0, "right", math.nan, 1.0), "alpha"), ((0.0, "right", 0.1, 0.0), "kl_weight"),
     ((0.0, "right", 0.1, math.inf), "kl_weight"), ((math.nan, "right", 0.1, 1.0), "eta"),
     (([], "right", 0.1, 1.0), "eta"), (([0.0, math.inf], "right", 0.1, 1.0), "eta"),
     ((None, "left", 1.0, 1.0), "eta"), ((None, "right", 0.1, 1.0), "eta")],
)
def test_bad_values_are_rejected_naming_the_field(args, name):
    with pytest.raises(ValueError, match=f"^{name}:"):
        Tilt(*args)


def test_values_are_normalised_and_check_is_the_same_rule():
    tilt = Tilt(np.float32(0.5), "left", np.float64(0.2), 3)
    assert type(tilt.eta) is float and type(tilt.alpha) is float and type(tilt.kl_weight) is float
    assert Tilt([1, 2.5], "right", 0.1, 1.0).eta == (1.0, 2.5)
    assert Tilt(np.array([1.0, 2.0]), "right", 0.1, 1.0).eta == (1.0, 2.0)
    assert Tilt.check("left", 1, 2) == ("left", 1.0, 2.0)
    with pytest.raises(ValueError, match="^alpha:"):
        Tilt.check("left", 2.0, 1.0)
    assert MEAN == Tilt(None, "right", 1.0, 1.0) and MEAN.is_mean and MEAN.name == "mean"
    assert RIGHT.name == "right-CVaR(0.1)" and LEFT.name == "left-CVaR(0.1)"
    with pytest.raises(AttributeError):
        RIGHT.alpha = 0.2  # frozen


def test_pseudo_reward_by_hand():
    r = np.array([-1.0, 0.0, 0.5, 2.0])
    np.testing.assert_allclose(Tilt(0.5, "right", 0.25, 1.0).pseudo_reward(r), [0.0, 0.0, 0.0, 6.0])
    np.testing.assert_allclose(Tilt(0.5, "left", 0.25, 1.0).pseudo_reward(r), [-6.0, -2.0, 0.0, 0.0])
    np.testing.assert_allclose(MEAN.pseudo_reward(r), r)
    per = Tilt((0.0, 1.0), "right", 0.5, 1.0)  # row i at eta_{cond_i}
    cond = np.array([0, 1, 0, 1])
    np.testing.assert_allclose(per.pseudo_reward(np.array([1.0, 1.0, -1.0, 3.0]), cond), [2.0, 0.0, 0.0, 4.0])
    g = per.pseudo_reward(torch.tensor([1.0, 1.0, -1.0, 3.0], dtype=torch.float64), torch.tensor(cond))
    assert isinstance(g, torch.Tensor) and g.tolist() == [2.0, 0.0, 0.0, 4.0]
    with pytest.raises(ValueError, match="condition"):
        per.pseudo_reward(r)
    # one threshold with conditions: every row at it
    np.testing.assert_allclose(Tilt(0.5, "right", 0.25, 1.0).pseudo_reward(r, cond), [0.0, 0.0, 0.0, 6.0])


def test_signal_is_the_pseudo_reward_signal_at_each_rows_threshold():
    gen = torch.Generator().manual_seed(0)
    r = torch.randn(64, generator=gen, dtype=torch.float64)
    grad = torch.randn(64, 3, generator=gen, dtype=torch.float64)
    valid = torch.rand(64, generator=gen) > 0.1
    cond = torch.randint(0, 2, (64,), generator=gen)
    tilt = Tilt((-0.5, 0.5), "left", 0.2, 1.0)
    out = tilt.signal(r, grad, valid, cond, grad_clip=1.5)
    eta_rows = torch.where(cond == 0, -0.5, 0.5).to(torch.float64)
    ref = pseudo_reward_signal(r, grad, valid, eta=eta_rows, side="left", alpha=0.2, grad_clip=1.5)
    for field in ("value", "grad", "valid"):
        assert torch.equal(getattr(out, field), getattr(ref, field)), field
    # by hand: grad g = 1{r < eta_c} grad r / alpha on valid rows, with ||grad r|| capped at 1.5
    capped = grad * (1.5 / grad.norm(dim=1, keepdim=True)).clamp(max=1.0)
    expect = torch.where((valid & (r < eta_rows))[:, None], capped / 0.2, torch.zeros_like(grad))
    torch.testing.assert_close(out.grad, expect)
    one = RIGHT.signal(r, grad, valid)
    assert torch.equal(one.value, pseudo_reward_signal(r, grad, valid, eta=1.0, side="right", alpha=0.1).value)


def test_weights_by_brute_force_with_and_without_conditions():
    rng = np.random.default_rng(0)
    r = rng.normal(size=200)
    valid = rng.random(200) > 0.1
    tilt = Tilt(0.8, "right", 0.2, 0.5)
    w = tilt.weights(r, valid)
    brute = np.where(valid, np.exp(np.maximum(r - 0.8, 0.0) / 0.2 / 0.5), 0.0)
    np.testing.assert_allclose(w, brute / brute.sum(), rtol=1e-12)
    np.testing.assert_array_equal(w, tilt_weights(r, eta=0.8, side="right", alpha=0.2, kl_weight=0.5, valid=valid))
    cond = rng.integers(0, 3, size=200)
    per = Tilt((0.0, 0.5, 1.0), "left", 0.3, 2.0)
    w = per.weights(r, valid, cond)
    for c, eta in enumerate(per.eta):
        rows = (cond == c) & valid
        g = -np.maximum(eta - r[rows], 0.0) / 0.3
        expect = np.exp(g / 2.0) / np.exp(g / 2.0).sum() / 3  # each condition sums to 1/C
        np.testing.assert_allclose(w[rows], expect, rtol=1e-12)
    assert w[~valid].sum() == 0.0 and w.sum() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="per-condition"):
        per.weights(r, valid)


def test_target_statistics_are_the_library_functions_and_at_picks_a_condition():
    r = np.random.default_rng(1).normal(size=500)
    kw = {"eta": 1.0, "side": "right", "alpha": 0.1, "kl_weight": 1.0}
    assert RIGHT.target_summary(r).to_dict() == target_summary(r, **kw).to_dict()
    assert RIGHT.target_interval(r, seed=3, n_boot=20).to_dict() == target_interval(r, seed=3, n_boot=20, **kw).to_dict()
    per = Tilt((0.0, 1.0), "right", 0.1, 1.0)
    assert per.at(1) == RIGHT and per.eta_for(0) == 0.0 and RIGHT.eta_for(5) == 1.0 and MEAN.eta_for(0) is None
    assert RIGHT.with_eta(2.0) == Tilt(2.0, "right", 0.1, 1.0)


@pytest.mark.parametrize("tilt", [RIGHT, LEFT, MEAN])
def test_statistic_and_its_standard_error(tilt):
    rng = np.random.default_rng(0)
    r = rng.normal(size=4000)
    value, se = tilt.statistic(r, np.ones(4000, dtype=bool))
    exact = float(r.mean()) if tilt.is_mean else cvar(r, side=tilt.side, alpha=0.1)
    assert value == pytest.approx(exact, abs=2e-3)  # the influence-function mean is the plug-in CVaR
    values = [tilt.statistic(rng.normal(size=4000))[0] for _ in range(300)]
    assert se == pytest.approx(float(np.std(values)), rel=0.25)
    closed = 0.0 if tilt.is_mean else (1 if tilt.side == "right" else -1) * norm.pdf(norm.ppf(0.9)) / 0.1
    assert float(np.mean(values)) == pytest.approx(closed, abs=0.02)  # N(0, 1): phi(z_0.9) / 0.1
    assert all(math.isnan(v) for v in tilt.statistic(np.array([1.0, np.nan]), np.array([True, True])))


def test_measure_and_refine_are_the_refinement_functions():
    r = np.array([-2.0, -1.0, 0.0, 1.0, 2.0])
    m = Tilt(0.5, "right", 0.4, 1.0).measure(r)
    assert (m.tail_mass, m.n, m.proposal) == (0.4, 5, var(r, side="right", alpha=0.4))
    assert Tilt(0.5, "left", 0.4, 1.0).measure(r).tail_mass == 0.6
    with pytest.raises(ValueError, match="no threshold"):
        MEAN.measure(r)

    def exact(eta: float) -> TailMeasurement:  # N(0, 1) rewards of a model that never moves: P(r > eta)
        return TailMeasurement(float(norm.sf(eta)), 10**8)

    tilt = Tilt(0.0, "right", 0.1, 1.0)
    result = tilt.refine(exact, rounds=12, step=1.0)
    direct = refine_threshold(exact, eta0=0.0, side="right", alpha=0.1, rounds=12, step=1.0)
    assert result.records() == direct.records() and result.eta == direct.eta
    assert result.eta == pytest.approx(norm.ppf(0.9), abs=1e-3)  # m(eta) = alpha at the 0.9-quantile


def test_dict_form_round_trips_and_reads_todays_records():
    for tilt in (RIGHT, MEAN, Tilt((0.25, -1.0), "left", 0.05, 4.0)):
        record = tilt.to_dict()
        assert list(record) == ["eta", "side", "alpha", "kl_weight"]
        assert Tilt.from_dict(json.loads(json.dumps(record))) == tilt
        assert pickle.loads(pickle.dumps(tilt)) == tilt  # it crosses the Ray Train boundary as itself
    per = {"eta": [0.25, -1.0], "side": "left", "alpha": 0.05, "kl_weight": 4.0}  # a model.pt's objective
    assert Tilt.from_dict(per).to_dict() == per and Tilt.from_dict(per).eta == (0.25, -1.0)
    summary = {"kind": "mean", "eta": None, "side": "right", "alpha": 1.0, "kl_weight": 10.0}  # summary.json's
    assert Tilt.from_dict(summary) == Tilt.mean(10.0)
