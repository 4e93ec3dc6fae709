"""The conditional image velocity (tfft.conv_model.ConvVelocity): shapes, zero start, prompts, a short fit."""

from __future__ import annotations

import pytest
import torch

from tfft.conv_model import ConvVelocity
from tfft.model import flow_matching_loss

PROMPTS = ["a red disc", "a blue square"]


def _net(**kwargs) -> ConvVelocity:
    torch.manual_seed(0)
    return ConvVelocity(**{"channels": 8, "time_features": 8, **kwargs}, conditions=PROMPTS)


def test_shapes_and_zero_velocity_at_initialisation():
    net = _net()
    x = torch.randn(5, 3, 16, 16)
    v = net(x, torch.rand(5), ["a red disc"] * 3 + ["a blue square"] * 2)
    assert v.shape == x.shape
    assert torch.equal(v, torch.zeros_like(v))
    assert net(torch.randn(2, 3, 8, 12), 0.3, "a red disc").shape == (2, 3, 8, 12)  # scalar t, one prompt for all


def test_prompts_are_checked():
    net = _net()
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(ValueError, match="'a green disc'"):
        net(x, torch.rand(2), ["a red disc", "a green disc"])
    with pytest.raises(ValueError, match="1 prompts for 2 samples"):
        net(x, torch.rand(2), ["a red disc"])
    with pytest.raises(ValueError, match="needs the prompts"):
        net(x, torch.rand(2), None)
    with pytest.raises(ValueError, match="distinct"):
        ConvVelocity(conditions=["a", "a"])
    with pytest.raises(ValueError, match="distinct"):
        ConvVelocity(conditions=[])


def test_each_prompt_has_its_own_embedding():
    """Zero output at the start; one optimisation step later the same (x, t) gives different velocities for the
    two prompts, and their embeddings are separate rows."""
    net = _net()
    x, t = torch.randn(4, 3, 16, 16), torch.rand(4)
    target = torch.randn(4, 3, 16, 16)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    loss = (net(x, t, ["a red disc", "a blue square"] * 2) - target).pow(2).mean()
    loss.backward()
    opt.step()
    with torch.no_grad():
        red, blue = net(x, t, "a red disc"), net(x, t, "a blue square")
    assert (red - blue).abs().max() > 1e-4
    assert net.cond_embedding.weight.shape == (2, 32)
    state = net.state_dict()
    rebuilt = ConvVelocity(channels=8, time_features=8, conditions=PROMPTS)
    rebuilt.load_state_dict(state)
    with torch.no_grad():
        assert torch.allclose(rebuilt(x, t, "a blue square"), blue)


def test_flow_matching_lowers_the_loss():
    """30 steps of conditional flow matching on two prompts' images (plain torch): the loss on a fixed
    evaluation batch (fixed t and noise) falls below 70% of its starting value (the zero velocity's)."""
    gen = torch.Generator().manual_seed(1)
    red = torch.zeros(64, 3, 16, 16)
    red[:, 0, 4:12, 4:12] = 1.0
    blue = torch.zeros(64, 3, 16, 16)
    blue[:, 2, 2:8, 8:14] = 1.0
    data = torch.cat([red, blue]).reshape(128, -1) * 2 - 1
    cond = ["a red disc"] * 64 + ["a blue square"] * 64
    net = _net()

    def fixed_loss() -> float:
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():
            return float(flow_matching_loss(lambda x, t: net(x.reshape(-1, 3, 16, 16), t, cond).reshape(128, -1),
                                            data, generator=g))

    start = fixed_loss()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(30):
        idx = torch.randint(0, 128, (32,), generator=gen)
        batch_cond = [cond[i] for i in idx.tolist()]
        loss = flow_matching_loss(lambda x, t: net(x.reshape(-1, 3, 16, 16), t, batch_cond).reshape(32, -1),
                                  data[idx], generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    end = fixed_loss()
    assert end < 0.7 * start, (start, end)
