"""The scenes task: renderer and data source, the reward's closed form, its tail and failure shares, gradients."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch

from rewards.scenes import (
    FAILURE_LEVEL,
    PROMPTS,
    TAIL_LEVEL,
    SceneReward,
    all_prompts,
    draw_scenes,
    parse_prompt,
    render,
    sample_scenes,
)


def _sig(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def _block_image(k: int, obj=(1.0, 0.0, 0.0), bg=(0.2, 0.2, 0.2)) -> torch.Tensor:
    """A hard-edged k x k block of colour obj (intensities) in the corner of a uniform background, (1, 768)."""
    u = np.broadcast_to(np.asarray(bg)[:, None, None], (3, 16, 16)).copy()
    u[:, :k, :k] = np.asarray(obj)[:, None, None]
    return torch.from_numpy(2 * u - 1).reshape(1, -1)


def _closed_form(k: int, m_in: float, m_out: float, h: float = 4.0, d: float = 5.0) -> float:
    """r of a block image whose pixels match the named colour by m_in inside and m_out outside (the docstring)."""
    w_in, w_out = _sig((m_in - 0.3) / 0.05), _sig((m_out - 0.3) / 0.05)
    area = k * k * w_in + (256 - k * k) * w_out
    fidelity = (k * k * w_in * m_in + (256 - k * k) * w_out * m_out) / (area + 1)
    presence = _sig((area - 6) / 1.5)
    large = _sig((area - 90) / 5) * _sig((190 - area) / 5)
    return presence * (2 * fidelity + h * large) - d * (1 - presence)


# --- prompts and renderer -------------------------------------------------------------------------------------


def test_prompt_grammar():
    assert parse_prompt("a blue square").channel == 2 and parse_prompt("a blue square").shape == "square"
    assert set(PROMPTS) <= set(all_prompts()) and len(all_prompts()) == 6
    with pytest.raises(ValueError, match="'a purple disc'"):
        parse_prompt("a purple disc")


def test_source_shapes_range_and_determinism():
    a = sample_scenes(64, 3, cond="a red disc")
    assert a.shape == (64, 768) and a.dtype == np.float32
    assert a.min() >= -1.0 and a.max() <= 1.0
    np.testing.assert_array_equal(a, sample_scenes(64, 3, cond="a red disc"))
    assert not np.array_equal(a, sample_scenes(64, 4, cond="a red disc"))
    # same seed, another prompt: independent draws, not the same layout recoloured
    other = sample_scenes(64, 3, cond="a red square")
    assert not np.allclose(a.reshape(64, 3, 16, 16)[:, 0], other.reshape(64, 3, 16, 16)[:, 0], atol=0.5)
    with pytest.raises(ValueError, match="needs a prompt"):
        sample_scenes(4, 0)
    with pytest.raises(ValueError, match="'a red triangle'"):
        sample_scenes(4, 0, cond="a red triangle")


def test_render_closed_form_disc_and_square():
    """A disc and a square of equal area: the centre pixel is the object, a far pixel the background, and a pixel
    inside the square's corner but outside the disc tells them apart."""
    centre, radius = np.array([[8.0, 8.0]]), np.array([4.0])
    obj, bg = np.array([[0.9, 0.1, 0.1]]), np.array([[0.2, 0.2, 0.2]])
    disc, square = render("disc", centre, radius, obj, bg)[0], render("square", centre, radius, obj, bg)[0]
    for img in (disc, square):
        np.testing.assert_allclose((img[:, 7, 7] + 1) / 2, obj[0], atol=2e-3)  # pixel centre (7.5, 7.5)
        np.testing.assert_allclose((img[:, 0, 0] + 1) / 2, bg[0], atol=1e-3)
    # pixel (4, 4): centre (4.5, 4.5), distance 4.95 from the disc's centre, Chebyshev 3.5 < half-side 3.54
    a_disc = _sig((4.0 - math.hypot(3.5, 3.5)) / 0.5)
    a_square = _sig((4.0 * math.sqrt(math.pi) / 2 - 3.5) / 0.5)
    np.testing.assert_allclose((disc[0, 4, 4] + 1) / 2, a_disc * 0.9 + (1 - a_disc) * 0.2, atol=1e-9)
    np.testing.assert_allclose((square[0, 4, 4] + 1) / 2, a_square * 0.9 + (1 - a_square) * 0.2, atol=1e-9)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_named_colour_dominates_inside_the_object(prompt):
    """The object's core (pixels at least 0.7 times as far from the image's median colour, the background, as the
    farthest one; the background is the median of the border pixels): the named channel leads the others by more than 0.45 in intensity for body and large objects
    (by construction at least 0.55, less noise); by less than 0.3 for washed-out and wrong-colour ones."""
    images, kinds = draw_scenes(600, 0, prompt)
    u = (images + 1) / 2
    k = parse_prompt(prompt).channel
    others = [c for c in range(3) if c != k]
    lead = []
    for img in u:
        border = np.concatenate([img[:, 0], img[:, -1], img[:, 1:-1, 0], img[:, 1:-1, -1]], axis=1)
        bg = np.median(border, axis=1)
        dist = np.linalg.norm(img - bg[:, None, None], axis=0)
        core = dist >= 0.7 * dist.max()
        lead.append(img[k][core].mean() - img[others][:, core].mean(axis=1).max())
    lead = np.asarray(lead)
    good = kinds <= 1
    assert lead[good].min() > 0.45
    assert lead[~good].max() < 0.3
    # the shares of the kinds: 85% body, 5% large, 5% washed out, 5% wrong colour
    shares = np.bincount(kinds, minlength=4) / len(kinds)
    np.testing.assert_allclose(shares, [0.85, 0.05, 0.05, 0.05], atol=0.035)


# --- reward ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [6, 11])
def test_perfect_object_scores_as_the_formula_says(k):
    """A pure red block (m = 1 inside, m = 0 on grey outside): 2F ~ 1.9 for 36 pixels, plus the bonus ~4 for 121."""
    r = SceneReward().evaluate(_block_image(k), ["a red disc"]).rewards.item()
    assert r == pytest.approx(_closed_form(k, 1.0, 0.0), abs=1e-9)
    if k == 6:
        assert 1.8 < r < 2.0
    else:
        assert TAIL_LEVEL < r < 6.0


def test_empty_image_and_wrong_colour_fall_in_the_failure_region():
    reward = SceneReward()
    empty = reward.evaluate(_block_image(0), ["a green square"]).rewards.item()
    assert empty == pytest.approx(_closed_form(0, 0.0, 0.0), abs=1e-9) and empty < FAILURE_LEVEL
    blue = _block_image(8, obj=(0.0, 0.0, 1.0))
    wrong = reward.evaluate(blue, ["a red disc"]).rewards.item()
    assert wrong == pytest.approx(_closed_form(8, -0.5, 0.0), abs=1e-9) and wrong < FAILURE_LEVEL
    right = reward.evaluate(blue, ["a blue disc"]).rewards.item()
    assert right == pytest.approx(_closed_form(8, 1.0, 0.0), abs=1e-9) and right > 1.5
    # the whole frame in the named colour earns no large-object bonus
    full = reward.evaluate(_block_image(16), ["a red disc"]).rewards.item()
    assert full == pytest.approx(_closed_form(16, 1.0, 0.0), abs=1e-9) and full < 2.1


def test_tail_and_failure_shares_on_the_source():
    """As documented: about 5% of the data above r = 4 (large objects), about 10% below r = -2 (failures)."""
    reward = SceneReward()
    x = np.concatenate([sample_scenes(1500, 11, cond=p) for p in PROMPTS])
    cond = [p for p in PROMPTS for _ in range(1500)]
    out = reward.evaluate(torch.from_numpy(x).double(), cond)
    r = out.rewards.numpy()
    assert out.valid.all()
    assert 0.035 < (r > TAIL_LEVEL).mean() < 0.065
    assert 0.08 < (r < FAILURE_LEVEL).mean() < 0.12
    body = r[(r >= FAILURE_LEVEL) & (r <= TAIL_LEVEL)]
    assert 0.6 < body.min() and body.max() < 2.5  # the body is moderate, well apart from both regions
    stats = reward.describe(x, np.ones(len(x), bool), cond)
    assert stats["tail_fraction"] == pytest.approx((r > TAIL_LEVEL).mean())
    assert stats["recognisable_fraction"] == pytest.approx(1 - stats["failure_fraction"], abs=0.01)


def test_gradient_matches_finite_differences():
    reward = SceneReward()
    x = torch.from_numpy(sample_scenes(3, 5, cond="a blue disc")).double()
    x = 0.9 * x  # away from the clipping at the ends of the range
    cond = ["a blue disc", "a red disc", "a green square"]
    batch, grad = reward.evaluate_with_grad(x, cond)
    assert grad.shape == x.shape and batch.valid.all()
    eps = 1e-6
    for i in range(3):
        pixels = list(torch.topk(grad[i].abs(), 4).indices) + [0, 400]
        for j in pixels:
            plus, minus = x.clone(), x.clone()
            plus[i, j] += eps
            minus[i, j] -= eps
            fd = (reward.evaluate(plus, cond).rewards[i] - reward.evaluate(minus, cond).rewards[i]) / (2 * eps)
            assert float(grad[i, j]) == pytest.approx(float(fd), rel=1e-4, abs=1e-7)


def test_prompts_are_required_and_checked():
    reward = SceneReward(prompts=["a red disc", "a blue disc"])
    x = torch.zeros(2, 768)
    with pytest.raises(ValueError, match="needs the prompts"):
        reward.evaluate(x)
    with pytest.raises(ValueError, match="'a green square'"):
        reward.evaluate(x, ["a red disc", "a green square"])
    with pytest.raises(ValueError, match="'a red blob'"):
        reward.evaluate_with_grad(x, ["a red blob", "a red disc"])
    with pytest.raises(ValueError, match="2 prompts for 3 samples"):
        SceneReward().evaluate(torch.zeros(3, 768), ["a red disc", "a red disc"])
    with pytest.raises(ValueError, match="'a pink disc'"):
        SceneReward(prompts=["a pink disc"])
    assert reward.evaluate(x, "a red disc").rewards.shape == (2,)  # one prompt for the whole batch


def test_only_non_finite_images_are_invalid():
    x = torch.zeros(3, 768, dtype=torch.float64)
    x[1, 5] = float("nan")
    batch, grad = SceneReward().evaluate_with_grad(x, "a red disc")
    assert batch.valid.tolist() == [True, False, True]
    assert batch.errors == ["", "nan", ""]
    assert torch.isfinite(grad).all() and (grad[1] == 0).all()


def test_reward_pickles_and_draws_its_figure(tmp_path):
    reward = pickle.loads(pickle.dumps(SceneReward(tail_height=3.0)))
    assert reward.tail_height == 3.0
    x = np.concatenate([sample_scenes(4, 0, cond=p) for p in PROMPTS[:2]])
    cond = [p for p in PROMPTS[:2] for _ in range(4)]
    (path,) = reward.figures(tmp_path, x, np.ones(8, bool), x, np.ones(8, bool), base_cond=cond, final_cond=cond)
    assert path.is_file() and path.stat().st_size > 1000
