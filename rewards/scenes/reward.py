"""The scenes reward: prompt fidelity, a bonus for rare large objects, and a deep well for failures.

For an image x (3, 16, 16) in [-1, 1] and a prompt naming colour channel k, with intensities
u = clip((x + 1) / 2, 0, 1) (clipping: values beyond the image range earn nothing):

    m(p) = u_k(p) - (u_j(p) + u_l(p)) / 2          colour match of pixel p (j, l the other channels), in [-1, 1]
    w(p) = sigmoid((m(p) - 0.3) / 0.05)            soft mask: pixel p shows the named colour
    A    = sum_p w(p)                              area of the named colour, in pixels
    F    = sum_p w(p) m(p) / (A + 1)               fidelity: the colour's strength inside the object
    P    = sigmoid((A - 6) / 1.5)                  presence: an object of at least ~6 pixels
    T    = sigmoid((A - 90) / 5) sigmoid((190 - A) / 5)   large object, with background still visible

    r(x, prompt) = P (2 F + H T) - D (1 - P),      H = ``tail_height`` = 4, D = ``failure_depth`` = 5.

A well-rendered object of the named colour scores 2 F, about 0.8 to 2.3 on the data (the body; soft edges and
jitter keep F below 1); a large one (area 90 to 190 of the 256 pixels) gains up to H more (the rare high tail);
no object of the named colour (washed out, wrong colour, empty image) leaves P ~ 0 and r ~ -D (the failure
region). Filling the whole frame with the colour
(A > 190) earns no bonus. Measured on ``sample_scenes`` with the default shares (``tests/rewards/test_scenes.py``,
``benchmarks/results/scenes_base.md``): about 5% of the data has r > 4 (the tail: the large objects) and about
10% has r < -2 (the failure region: washed-out and wrong-colour objects); the rest lies in [0.7, 2.3].

The reward is smooth in x inside the image range and defined everywhere; only a non-finite image makes it NaN
(invalid). The shape named by the prompt is not scored: shape is left to the prior (the data).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rewards.base import Reward, RewardBatch
from rewards.scenes.prompts import all_prompts, parse_prompt
from rewards.scenes.render import SAMPLE_SHAPE

__all__ = ["SceneParts", "scene_parts", "scene_reward", "channels_of", "SceneReward", "TAIL_LEVEL", "FAILURE_LEVEL"]

TAIL_LEVEL = 4.0
"""r above this is the tail (a large object of the named colour)."""
FAILURE_LEVEL = -2.0
"""r below this is the failure region (no object of the named colour)."""

_MATCH_AT, _MATCH_WIDTH = 0.3, 0.05
_PRESENT_AT, _PRESENT_WIDTH = 6.0, 1.5
_LARGE_AT, _LARGE_UP_TO, _LARGE_WIDTH = 90.0, 190.0, 5.0


@dataclass(frozen=True)
class SceneParts:
    """The reward's parts per image, each (n,): ``area`` A, ``fidelity`` F, ``presence`` P, ``large`` T."""

    area: torch.Tensor
    fidelity: torch.Tensor
    presence: torch.Tensor
    large: torch.Tensor


def channels_of(cond: Sequence[str] | None, n: int, known: Sequence[str]) -> torch.Tensor:
    """The named colour channel of each of n prompts, (n,) long; ValueError naming a missing or unknown prompt."""
    if cond is None:
        raise ValueError("the scenes reward needs the prompts: evaluate(x, cond=[...]) with one prompt per sample")
    if isinstance(cond, str):
        cond = [cond] * n
    cond = list(cond)
    if len(cond) != n:
        raise ValueError(f"the scenes reward got {len(cond)} prompts for {n} samples")
    cache: dict[str, int] = {}
    for text in cond:
        if text not in cache:
            if text not in known:
                raise ValueError(f"the scenes reward does not know the prompt {text!r}; it knows {list(known)}")
            cache[text] = parse_prompt(text).channel
    return torch.tensor([cache[c] for c in cond], dtype=torch.long)


def scene_parts(x: torch.Tensor, channel: torch.Tensor) -> SceneParts:
    """A, F, P, T (module docstring) of images x (n, 768) or (n, 3, 16, 16) with named channels (n,)."""
    u = ((x.reshape(x.shape[0], *SAMPLE_SHAPE) + 1.0) / 2.0).clamp(0.0, 1.0)
    named = torch.nn.functional.one_hot(channel.to(x.device), 3).to(u.dtype)  # (n, 3)
    weights = 1.5 * named - 0.5  # +1 on the named channel, -1/2 on the others
    m = (weights[:, :, None, None] * u).sum(1)  # (n, 16, 16)
    w = torch.sigmoid((m - _MATCH_AT) / _MATCH_WIDTH)
    area = w.sum((1, 2))
    fidelity = (w * m).sum((1, 2)) / (area + 1.0)
    presence = torch.sigmoid((area - _PRESENT_AT) / _PRESENT_WIDTH)
    large = torch.sigmoid((area - _LARGE_AT) / _LARGE_WIDTH) * torch.sigmoid((_LARGE_UP_TO - area) / _LARGE_WIDTH)
    return SceneParts(area=area, fidelity=fidelity, presence=presence, large=large)


def scene_reward(x: torch.Tensor, channel: torch.Tensor, *, tail_height: float = 4.0,
                 failure_depth: float = 5.0) -> torch.Tensor:
    """r = P (2 F + H T) - D (1 - P) for x (n, 768), channel (n,) -> (n,); differentiable."""
    p = scene_parts(x, channel)
    return p.presence * (2.0 * p.fidelity + tail_height * p.large) - failure_depth * (1.0 - p.presence)


class SceneReward(Reward):
    """The scenes reward as a :class:`Reward` (differentiable): ``evaluate(x (n, 768), cond)`` with cond the n
    prompts (or one prompt for all). ``prompts``: the prompts it accepts (default: the whole grammar)."""

    name = "scenes"
    version = "1"
    differentiable = True

    def __init__(self, tail_height: float = 4.0, failure_depth: float = 5.0, prompts: Sequence[str] | None = None):
        if not tail_height >= 0 or not failure_depth >= 0:
            raise ValueError(f"tail_height and failure_depth must be >= 0, got {tail_height}, {failure_depth}")
        self.tail_height = float(tail_height)
        self.failure_depth = float(failure_depth)
        self.prompts = tuple(all_prompts() if prompts is None else prompts)
        for text in self.prompts:
            parse_prompt(text)

    def _check(self, x: torch.Tensor) -> None:
        if x.ndim != 2 or x.shape[1] != 768:
            raise ValueError(f"SceneReward expects flattened 3x16x16 images of shape (n, 768), got {tuple(x.shape)}")

    def evaluate(self, x: torch.Tensor, cond: Sequence[str] | str | None = None) -> RewardBatch:
        self._check(x)
        channel = channels_of(cond, x.shape[0], self.prompts)
        r = scene_reward(x, channel, tail_height=self.tail_height, failure_depth=self.failure_depth)
        finite = torch.isfinite(x.detach()).all(1)
        r = torch.where(finite, r, torch.full_like(r, float("nan")))
        valid = torch.isfinite(r.detach())
        errors = None if bool(valid.all()) else ["" if v else "nan" for v in valid.tolist()]
        return RewardBatch(r, valid, errors)

    def __call__(self, x: torch.Tensor, cond: Sequence[str] | str | None = None) -> RewardBatch:
        return self.evaluate(x, cond)

    def evaluate_with_grad(self, x: torch.Tensor, cond: Sequence[str] | str | None = None
                           ) -> tuple[RewardBatch, torch.Tensor]:
        """Rewards and d r / d x (n, 768); rows of invalid samples are zero."""
        self._check(x)
        channels_of(cond, x.shape[0], self.prompts)  # a bad prompt fails before any work
        x = x.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            out = self.evaluate(x, cond)
            valid = out.valid
            (grad,) = torch.autograd.grad(torch.where(valid, out.rewards, 0.0).sum(), x)
        grad = torch.where(valid[:, None], torch.nan_to_num(grad), torch.zeros_like(grad)).detach()
        return RewardBatch(out.rewards.detach(), valid, out.errors), grad

    def describe(self, x: Any, valid: Any, cond: Sequence[str] | None = None) -> dict[str, float]:
        """Fractions of valid samples in the tail (r > 4), in the failure region (r < -2) and recognisable
        (presence > 1/2), and the mean area of the named colour; {} without the prompts."""
        if cond is None:
            return {}
        x_t = torch.as_tensor(np.asarray(x, dtype=np.float64))
        keep = np.asarray(valid, dtype=bool) & np.isfinite(x_t.numpy()).all(1)
        if not keep.any():
            return {}
        rows = np.flatnonzero(keep)
        cond_kept = [list(cond)[i] for i in rows]
        with torch.no_grad():
            channel = channels_of(cond_kept, len(rows), self.prompts)
            parts = scene_parts(x_t[rows], channel)
            r = scene_reward(x_t[rows], channel, tail_height=self.tail_height, failure_depth=self.failure_depth)
        return {
            "tail_fraction": float((r > TAIL_LEVEL).double().mean()),
            "failure_fraction": float((r < FAILURE_LEVEL).double().mean()),
            "recognisable_fraction": float((parts.presence > 0.5).double().mean()),
            "mean_area": float(parts.area.mean()),
        }

    def figures(self, out_dir: Any, base_x: Any, base_valid: Any, final_x: Any, final_valid: Any,
                base_cond: Sequence[str] | None = None, final_cond: Sequence[str] | None = None) -> list[Path]:
        """``scenes.png``: a grid of base and fine-tuned samples per prompt (without prompts: the first ones)."""
        from rewards.scenes.plots import plot_scene_grid

        path = Path(out_dir) / "scenes.png"
        plot_scene_grid(path, np.asarray(base_x), np.asarray(base_valid, dtype=bool), base_cond,
                        np.asarray(final_x), np.asarray(final_valid, dtype=bool), final_cond)
        return [path]
