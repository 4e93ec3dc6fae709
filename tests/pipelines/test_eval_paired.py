"""The guard's paired evaluation check (`pipelines.eval_paired`): base and fine-tuned samples with common noise."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipelines.bankio import Bank
from pipelines.eval_guard import check_evaluation
from pipelines.eval_paired import check_paired
from tfft.objective import Tilt

RIGHT = Tilt(1.0, "right", 0.1, 1.0)


def _bank(rewards: np.ndarray, ids: np.ndarray | None = None, cond: np.ndarray | None = None) -> Bank:
    n = len(rewards)
    valid = np.isfinite(rewards)
    return Bank(np.arange(n) if ids is None else ids, np.zeros((n, 2)), rewards, valid,
                np.where(valid, "", "nan").astype(object), np.zeros(n), np.ones(n, dtype=int), np.zeros(n, dtype=bool),
                cond=cond)


def test_a_small_shift_under_common_noise_is_resolved_where_independent_samples_cannot():
    """Rewards of the fine-tuned model = the base's rewards of the same noise + 0.03 (better) or - 0.03 (worse),
    plus a little noise of their own: the paired difference has the closed form mean(phi_f - phi_b) with the
    standard error std(phi_f - phi_b) / sqrt(n), a tenth of the unpaired one, and decides both right."""
    rng = np.random.default_rng(0)
    rb = rng.normal(size=4000)
    for shift in (0.03, -0.03):
        rf = rb + shift + 0.01 * rng.normal(size=4000)
        check = check_paired(_bank(rb), _bank(rf), RIGHT)
        pb, pf = RIGHT.influence(rb), RIGHT.influence(rf)
        assert check.finetuned - check.base == pytest.approx(float((pf - pb).mean()))
        assert check.difference_se == pytest.approx(float((pf - pb).std(ddof=1) / math.sqrt(4000)))
        unpaired = check_evaluation(rb, np.isfinite(rb), rf, np.isfinite(rf), RIGHT)
        assert check.difference_se < 0.1 * unpaired.difference_se
        assert check.worse == (shift < 0) and check.rows == "paired" and check.paired_n == 4000
        assert "paired over 4000 samples" in check.describe()
        # at 2 standard errors the paired check still rejects the loss: 0.03 is many paired errors
        assert check_paired(_bank(rb), _bank(rf), RIGHT, margin=2.0).worse == (shift < 0)
        assert not check_evaluation(rb, np.isfinite(rb), rf, np.isfinite(rf), RIGHT, margin=2.0).worse


def test_rows_pair_by_id_and_failures_drop_their_pair():
    rng = np.random.default_rng(1)
    rb = rng.normal(size=1000)
    rf = rb + 0.1
    order = rng.permutation(1000)  # the fine-tuned bank's rows in another order: paired by id
    rf_failed = rf.copy()
    rf_failed[:10] = np.nan
    check = check_paired(_bank(rb), _bank(rf_failed[order], ids=order), RIGHT)
    assert check.paired_n == 990 and check.finetuned - check.base == pytest.approx(0.1, abs=1e-6)
    assert check.finetuned_validity == pytest.approx(0.99) and not check.worse
    with pytest.raises(ValueError, match="same ids"):
        check_paired(_bank(rb), _bank(rf[:999]), RIGHT)
    with pytest.raises(ValueError, match="margin"):
        check_paired(_bank(rb), _bank(rf), RIGHT, margin=-1)


def test_with_a_threshold_per_condition_the_difference_is_the_mean_over_conditions():
    rng = np.random.default_rng(2)
    cond = np.repeat([0, 1], 1000)
    rb = np.where(cond == 0, 0.0, 10.0) + rng.normal(size=2000)
    rf = rb + np.where(cond == 0, 0.4, -0.1)
    check = check_paired(_bank(rb, cond=cond), _bank(rf, cond=cond), Tilt((1.3, 11.3), "right", 0.1, 1.0))
    assert check.finetuned - check.base == pytest.approx(0.15, abs=1e-9) and not check.worse
    assert check.finetuned_per_condition == pytest.approx(
        tuple(float(RIGHT.influence(rf[cond == c]).mean()) for c in (0, 1)))
