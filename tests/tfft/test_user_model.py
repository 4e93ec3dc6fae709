"""tfft.user_model: the flat adapter of a user's network (reshape in, flatten out) and its transparent state dict."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tfft.diffusion import VPDiffusionFlow
from tfft.user_model import FlatVelocity, check_sample_shape


class Images(nn.Module):
    """A velocity on (n, 2, 3, 4) images with a BatchNorm (versioned metadata) and a child called ``network``."""

    def __init__(self) -> None:
        super().__init__()
        self.network = nn.Conv2d(3, 2, 1)
        self.norm = nn.BatchNorm2d(2)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: None) -> torch.Tensor:
        assert x.shape[1:] == (2, 3, 4) and t.shape == (x.shape[0],) and cond is None
        time = t[:, None, None, None].expand(-1, 1, 3, 4)
        return self.norm(self.network(torch.cat([x, time], dim=1)))


def test_reshapes_in_and_flattens_out():
    network = Images().eval()
    flat = FlatVelocity(network, [2, 3, 4])
    x, t = torch.randn(5, 24), torch.rand(5)
    assert torch.equal(flat(x, t), network(x.reshape(5, 2, 3, 4), t, None).reshape(5, 24))
    assert flat(x, 0.5).shape == (5, 24)  # a scalar time is broadcast
    with pytest.raises(ValueError, match=r"x must have shape \(n, 24\)"):
        flat(torch.randn(5, 23), t)
    with pytest.raises(ValueError, match="returned a velocity of shape"):
        FlatVelocity(_Half(), [24])(x, t)


class _Half(nn.Module):
    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: None) -> torch.Tensor:
        return x[:, :12]


def test_state_dict_is_the_networks_at_any_depth():
    network = Images()
    with torch.no_grad():
        network.norm.running_mean.add_(1.0)
    flat = FlatVelocity(network, [2, 3, 4])
    assert list(flat.state_dict()) == list(network.state_dict())
    copy = Images()
    copy.load_state_dict(flat.state_dict())  # strict
    assert torch.equal(copy.norm.running_mean, network.norm.running_mean)
    wrapped = FlatVelocity(Images(), [2, 3, 4])
    wrapped.load_state_dict(network.state_dict())
    assert torch.equal(wrapped.network.network.weight, network.network.weight)
    outer = nn.ModuleDict({"model": flat})  # nested: the prefix of the parent is kept
    assert list(outer.state_dict()) == [f"model.{k}" for k in network.state_dict()]
    nn.ModuleDict({"model": FlatVelocity(Images(), [2, 3, 4])}).load_state_dict(outer.state_dict())
    # two wrappers in a row (a diffusion network as a flow, flattened): still the network's own keys
    schedule = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 100), 0)
    two = FlatVelocity(VPDiffusionFlow(Images(), schedule), [2, 3, 4])
    two.load_state_dict(network.state_dict())
    assert list(two.state_dict()) == list(network.state_dict())


@pytest.mark.parametrize("shape", [[], [0], [2, -1], [2.0]])
def test_sample_shape_must_be_positive_ints(shape):
    with pytest.raises(ValueError, match="sample_shape"):
        check_sample_shape(shape)
