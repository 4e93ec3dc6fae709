"""The reward interface: loading by import path, validity, gradients, picklability."""

from __future__ import annotations

import pickle

import pytest
import torch

from rewards.base import FunctionReward, Reward, RewardBatch, import_object, load_reward
from rewards.toy2d import TailReward2D, tail_reward


def quadratic(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    return -scale * (x**2).sum(-1)


def nan_for_negative_first(x: torch.Tensor) -> torch.Tensor:
    r = x.sum(-1)
    return torch.where(x[:, 0] < 0, torch.full_like(r, float("nan")), r)


class NoGradReward(Reward):
    name = "nograd"

    def evaluate(self, x: torch.Tensor) -> RewardBatch:
        r = x[:, 0].detach().clone()
        return RewardBatch(r, torch.ones_like(r, dtype=torch.bool))


def test_load_class_function_and_kwargs():
    reward = load_reward("rewards.toy2d:TailReward2D", {"peak_height": 3.0})
    assert isinstance(reward, TailReward2D) and reward.peak_height == 3.0
    fn_reward = load_reward(f"{__name__}:quadratic", {"scale": 2.0})
    assert isinstance(fn_reward, FunctionReward) and fn_reward.differentiable
    x = torch.tensor([[1.0, 2.0], [0.0, -1.0]])
    torch.testing.assert_close(fn_reward(x).rewards, torch.tensor([-10.0, -2.0]))


@pytest.mark.parametrize(
    "target, fragment",
    [
        ("no_colon", "must look like"),
        ("not_a_module_xyz:f", "cannot import module"),
        ("rewards.toy2d:missing", "has no attribute"),
        ("pickle:Pickler", "must subclass"),
    ],
)
def test_bad_import_paths_name_the_path(target, fragment):
    with pytest.raises(ValueError, match=fragment):
        load_reward(target)


def test_bad_kwargs_are_reported():
    with pytest.raises(ValueError, match="rejected reward.kwargs"):
        load_reward("rewards.toy2d:TailReward2D", {"nope": 1})


def test_a_constructor_that_fails_is_one_error_naming_the_reward(tmp_path, import_path):
    (tmp_path / "broken_reward.py").write_text(
        "from rewards.base import Reward\n"
        "class NeedsFile(Reward):\n"
        "    def __init__(self, path):\n"
        "        open(path)\n"
        "    def evaluate(self, x, cond=None):\n"
        "        return x.sum(-1)\n"
    )
    import_path(str(tmp_path))
    with pytest.raises(ValueError, match=r"reward 'broken_reward:NeedsFile' could not be built .*FileNotFoundError"):
        load_reward("broken_reward:NeedsFile", {"path": str(tmp_path / "missing.bin")})


def test_function_reward_marks_nan_invalid_and_grad_rows_zero():
    reward = FunctionReward(nan_for_negative_first)
    x = torch.tensor([[1.0, 2.0], [-1.0, 5.0], [0.5, 0.5]])
    out, grad = reward.evaluate_with_grad(x)
    assert out.valid.tolist() == [True, False, True]
    assert out.errors == ["", "nan", ""]
    torch.testing.assert_close(grad, torch.tensor([[1.0, 1.0], [0.0, 0.0], [1.0, 1.0]]))


def test_gradient_matches_finite_differences():
    reward = TailReward2D()
    x = torch.randn(16, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 2
    _, grad = reward.evaluate_with_grad(x)
    eps = 1e-6
    for j in range(2):
        e = torch.zeros(2, dtype=torch.float64)
        e[j] = eps
        fd = (tail_reward(x + e) - tail_reward(x - e)) / (2 * eps)
        torch.testing.assert_close(grad[:, j], fd, rtol=1e-6, atol=1e-7)


def test_reward_without_gradients_refuses_grad():
    with pytest.raises(TypeError, match="no gradients"):
        NoGradReward().evaluate_with_grad(torch.zeros(2, 2))


@pytest.mark.parametrize("target", ["rewards.toy2d:TailReward2D", f"{__name__}:quadratic"])
def test_rewards_are_picklable(target):
    reward = load_reward(target)
    clone = pickle.loads(pickle.dumps(reward))
    x = torch.randn(5, 2)
    torch.testing.assert_close(clone(x).rewards, reward(x).rewards)


def test_import_object_dotted_attribute():
    assert import_object("rewards.toy2d:TailReward2D.evaluate") is TailReward2D.evaluate


def test_a_plain_function_reward_is_versioned_by_its_source(tmp_path, import_path):
    # Editing a plain function must change its cache identity (it has no version to bump).
    import importlib

    from rewards.base import load_reward

    import_path(str(tmp_path))
    module = tmp_path / "edited_reward.py"
    module.write_text("def reward(x):\n    return -(x ** 2).sum(-1)\n")
    first = load_reward("edited_reward:reward").version
    assert load_reward("edited_reward:reward").version == first
    module.write_text("def reward(x):\n    return -(x ** 2).sum(-1) + 1.0\n")
    import edited_reward

    importlib.reload(edited_reward)
    assert load_reward("edited_reward:reward").version != first
