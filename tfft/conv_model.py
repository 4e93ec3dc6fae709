"""A small conditional velocity network for images: a two-level U-Net with time features and a learned prompt
embedding (DESIGN.md section 8: a model is a factory by import path).

``ConvVelocity(conditions=[...], channels=C)`` is a ``model.target`` factory: ``forward(x (n, 3, H, W), t (n,),
cond)`` returns the velocity of the linear interpolant x_t = t x1 + (1 - t) x0 (t = 0 noise, t = 1 data), shaped
like x. ``cond`` is a list of n prompts, each one of ``conditions`` (the i-th entry has its own learned
embedding row i); an unknown prompt is a ValueError naming it.

Layout (H, W even):

    e   = MLP(phi(t)) + E[cond]                        (n, 4C): Fourier time features phi, embedding table E
    h0  = conv3x3(x)                                   (n, C, H, W)
    h1  = Res(h0, e)                                   (n, C, H, W)       skip
    h2  = Res(Res(conv3x3_stride2(h1), e), e)          (n, 2C, H/2, W/2)
    h3  = Res([conv3x3(upsample(h2)), h1], e)          (n, C, H, W)
    v   = conv3x3(SiLU(GroupNorm(h3)))                 (n, 3, H, W), weights and bias zero at initialisation

Res(h, e) = h' + conv(SiLU(GN(conv(SiLU(GN(h))) + Linear(e)))), h' = h or a 1x1 projection when the width
changes. The zero-initialised last layer makes the untrained network the zero velocity.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from tfft.model import _expand_time

__all__ = ["ConvVelocity", "ResBlock"]


def _groups(channels: int) -> int:
    return math.gcd(channels, 8)


class ResBlock(nn.Module):
    """Residual block with an additive embedding: (n, c_in, H, W), (n, E) -> (n, c_out, H, W)."""

    def __init__(self, c_in: int, c_out: int, embed: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(c_in), c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.embed = nn.Linear(embed, c_out)
        self.norm2 = nn.GroupNorm(_groups(c_out), c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Identity() if c_in == c_out else nn.Conv2d(c_in, c_out, 1)
        self.act = nn.SiLU()

    def forward(self, h: Tensor, e: Tensor) -> Tensor:
        y = self.conv1(self.act(self.norm1(h))) + self.embed(e)[:, :, None, None]
        return self.skip(h) + self.conv2(self.act(self.norm2(y)))


class ConvVelocity(nn.Module):
    """Conditional image velocity v(x (n, c, H, W), t (n,), cond: n prompts) -> (n, c, H, W).

    Args:
        conditions: the prompts it knows (at least one, distinct); row i of the embedding belongs to entry i.
        channels: C, the width at full resolution (2C at half resolution).
        time_features: F, Fourier time features (even, >= 2), frequencies geometric in [1, 100].
        image_channels: c of the images (3 for RGB).
    """

    def __init__(self, conditions: Sequence[str], channels: int = 32, time_features: int = 32,
                 image_channels: int = 3) -> None:
        super().__init__()
        conditions = [str(c) for c in conditions] if not isinstance(conditions, str) else [conditions]
        if not conditions or len(set(conditions)) != len(conditions):
            raise ValueError(f"conditions must be a non-empty list of distinct prompts, got {conditions!r}")
        if channels < 1 or time_features < 2 or time_features % 2:
            raise ValueError(f"channels must be >= 1 and time_features even >= 2, got {channels}, {time_features}")
        self.conditions = tuple(conditions)
        self._index = {c: i for i, c in enumerate(self.conditions)}
        c, e = channels, 4 * channels
        half = time_features // 2
        self.register_buffer("frequencies", torch.exp(torch.linspace(0.0, math.log(100.0), half)), persistent=False)
        self.time_mlp = nn.Sequential(nn.Linear(time_features, e), nn.SiLU(), nn.Linear(e, e))
        self.cond_embedding = nn.Embedding(len(self.conditions), e)
        self.inp = nn.Conv2d(image_channels, c, 3, padding=1)
        self.res1 = ResBlock(c, c, e)
        self.down = nn.Conv2d(c, 2 * c, 3, stride=2, padding=1)
        self.res2a = ResBlock(2 * c, 2 * c, e)
        self.res2b = ResBlock(2 * c, 2 * c, e)
        self.up = nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(2 * c, c, 3, padding=1))
        self.res3 = ResBlock(2 * c, c, e)
        self.out_norm = nn.GroupNorm(_groups(c), c)
        self.out = nn.Conv2d(c, image_channels, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def condition_index(self, cond: Sequence[str] | str, n: int, device: torch.device) -> Tensor:
        """Embedding rows of n prompts, (n,) long; one string stands for all n."""
        if cond is None:
            raise ValueError(f"ConvVelocity needs the prompts (cond), one of {list(self.conditions)} per sample")
        prompts = [cond] * n if isinstance(cond, str) else list(cond)
        if len(prompts) != n:
            raise ValueError(f"ConvVelocity got {len(prompts)} prompts for {n} samples")
        try:
            rows = [self._index[p] for p in prompts]
        except KeyError as exc:
            raise ValueError(f"ConvVelocity does not know the prompt {exc.args[0]!r}; it was built for "
                             f"{list(self.conditions)}") from None
        return torch.tensor(rows, dtype=torch.long, device=device)

    def embedding(self, t: Tensor, cond: Sequence[str] | str, n: int) -> Tensor:
        """e = MLP(phi(t)) + E[cond], (n, 4C)."""
        angles = t[:, None] * self.frequencies[None]
        phi = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
        return self.time_mlp(phi) + self.cond_embedding(self.condition_index(cond, n, t.device))

    def forward(self, x: Tensor, t: Tensor | float, cond: Sequence[str] | str) -> Tensor:
        """x (n, c, H, W), t scalar or (n,), cond n prompts -> velocity (n, c, H, W)."""
        if x.dim() != 4 or x.shape[2] % 2 or x.shape[3] % 2:
            raise ValueError(f"x must have shape (n, c, H, W) with H and W even, got {tuple(x.shape)}")
        n = x.shape[0]
        e = self.embedding(_expand_time(t, x), cond, n)
        h1 = self.res1(self.inp(x), e)
        h2 = self.res2b(self.res2a(self.down(h1), e), e)
        h3 = self.res3(torch.cat([self.up(h2), h1], dim=1), e)
        return self.out(torch.nn.functional.silu(self.out_norm(h3)))
