"""The built-in 2-D task: deterministic data, and three objectives with different exact optima."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rewards.toy2d import COMPONENTS, TailReward2D, sample_base, tail_reward
from tfft.tail import solve_threshold
from tfft.target import target_summary


def test_sample_base_is_deterministic_per_seed_and_has_the_mixture_moments():
    a, b, c = sample_base(50_000, 3), sample_base(50_000, 3), sample_base(50_000, 4)
    assert a.shape == (50_000, 2)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    weights = np.array([w for w, _, _ in COMPONENTS])
    means = np.array([m for _, m, _ in COMPONENTS])
    expected_mean = weights @ means
    np.testing.assert_allclose(a.mean(0), expected_mean, atol=0.03)


def test_reward_rejects_wrong_dimension():
    with pytest.raises(ValueError, match=r"shape \(n, 2\)"):
        TailReward2D().evaluate(torch.zeros(3, 4))


def test_objectives_have_visibly_different_exact_optima():
    """Exact target statistics (DESIGN §5) on a large base sample: each objective wins on its own side."""
    x = sample_base(100_000, 0)
    r = tail_reward(torch.as_tensor(x)).numpy()
    kl_weight, alpha = 10.0, 0.1
    mean_t = target_summary(r, eta=None, side="right", alpha=1.0, kl_weight=kl_weight)
    stats = {}
    for side in ("right", "left"):
        th = solve_threshold(r, side=side, alpha=alpha, kl_weight=kl_weight)
        assert th.ess > 5000
        stats[side] = target_summary(r, eta=th.eta, side=side, alpha=alpha, kl_weight=kl_weight)
    reward_range = r.max() - r.min()
    assert stats["right"].cvar_right["0.1"] > mean_t.cvar_right["0.1"] + 0.05 * reward_range
    assert stats["left"].cvar_left["0.1"] > mean_t.cvar_left["0.1"] + 0.2 * reward_range
    # the right-tail target keeps the failures, the left-tail target removes them
    assert stats["right"].cvar_left["0.1"] < stats["left"].cvar_left["0.1"] - 0.2 * reward_range
