"""The built-in 2-D task: a base distribution whose reward has a body, a rare peak and a failure region.

Base data (the pretraining distribution, a Gaussian mixture in R^2):

| component | weight | mean | std | reward there |
|---|---|---|---|---|
| body | 0.75 | (0, 0) | 0.8 | about +1 (moderate) |
| failures | 0.15 | (-2.5, -1.5) | 0.5 | about -5 (very low) |
| frontier | 0.10 | (2.0, 1.5) | 0.6 | rises to about +7 at a peak at (2.2, 1.7) |

Reward (smooth, differentiable everywhere):

    r(x) = 1 - 0.1 ||x||^2 - 6 exp(-||x - m_F||^2 / (2 * 0.9^2)) + 7 exp(-||x - m_P||^2 / (2 * 0.7^2))

So mean fine-tuning drifts the whole distribution towards higher reward, right-CVaR fine-tuning piles
mass onto the rare peak, and left-CVaR fine-tuning empties the failure region and leaves the rest alone.

With ``crash_radius`` > 0 the reward also *fails* (NaN, reason 'crash') within that distance of
``crash_centre`` (default: the failure centre), as a simulator that crashes on some designs: the task of
``objective.invalid_reward``. At the failure centre the crashes hide inside the low-reward well (their
neighbours are in the left tail anyway); elsewhere, e.g. in the body, nothing but the crash marks them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from rewards.base import Reward, RewardBatch

__all__ = ["sample_base", "tail_reward", "distance_penalty", "TailReward2D", "COMPONENTS"]

# (weight, mean, std) of the base mixture.
COMPONENTS: tuple[tuple[float, tuple[float, float], float], ...] = (
    (0.75, (0.0, 0.0), 0.8),
    (0.15, (-2.5, -1.5), 0.5),
    (0.10, (2.0, 1.5), 0.6),
)
_FAILURE_CENTRE = (-2.5, -1.5)
_PEAK_CENTRE = (2.2, 1.7)


def sample_base(n: int, seed: int) -> np.ndarray:
    """Draw n pretraining samples, shape (n, 2), deterministically from ``seed``."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = np.random.default_rng(seed)
    weights = np.array([c[0] for c in COMPONENTS])
    which = rng.choice(len(COMPONENTS), size=n, p=weights / weights.sum())
    means = np.array([c[1] for c in COMPONENTS])[which]
    stds = np.array([c[2] for c in COMPONENTS])[which]
    return means + stds[:, None] * rng.standard_normal((n, 2))


def tail_reward(
    x: torch.Tensor,
    *,
    failure_depth: float = 6.0,
    peak_height: float = 7.0,
    peak_width: float = 0.7,
) -> torch.Tensor:
    """r(x) for x of shape (n, 2) -> (n,); differentiable."""
    failure = torch.as_tensor(_FAILURE_CENTRE, dtype=x.dtype, device=x.device)
    peak = torch.as_tensor(_PEAK_CENTRE, dtype=x.dtype, device=x.device)
    d_fail = ((x - failure) ** 2).sum(-1)
    d_peak = ((x - peak) ** 2).sum(-1)
    return (
        1.0
        - 0.1 * (x**2).sum(-1)
        - failure_depth * torch.exp(-d_fail / (2 * 0.9**2))
        + peak_height * torch.exp(-d_peak / (2 * peak_width**2))
    )


def distance_penalty(x: torch.Tensor, *, centre: tuple[float, ...] = (0.0, 0.0)) -> torch.Tensor:
    """-||x - centre||^2 for x of shape (n, d) -> (n,); differentiable. A second term for the 2-D task
    (``tune_configs/toy2d_composite.yaml``: `rewards.compose.WeightedSum`), pulling samples towards ``centre``."""
    c = torch.as_tensor(centre, dtype=x.dtype, device=x.device)
    if c.shape != (x.shape[-1],):
        raise ValueError(f"distance_penalty: centre has {c.numel()} coordinates for samples of dimension {x.shape[-1]}")
    return -((x - c) ** 2).sum(-1)


class TailReward2D(Reward):
    """The 2-D task's reward as a :class:`Reward` (differentiable; kwargs as in :func:`tail_reward`)."""

    name = "toy2d"
    version = "1"
    differentiable = True

    def __init__(
        self,
        failure_depth: float = 6.0,
        peak_height: float = 7.0,
        peak_width: float = 0.7,
        crash_radius: float = 0.0,
        crash_centre: tuple[float, float] | list[float] = _FAILURE_CENTRE,
    ):
        if peak_width <= 0:
            raise ValueError(f"peak_width must be > 0, got {peak_width}")
        if not crash_radius >= 0:
            raise ValueError(f"crash_radius must be >= 0, got {crash_radius}")
        self.failure_depth = float(failure_depth)
        self.peak_height = float(peak_height)
        self.peak_width = float(peak_width)
        self.crash_radius = float(crash_radius)
        centre = tuple(float(c) for c in crash_centre)
        if len(centre) != 2:
            raise ValueError(f"crash_centre must be two numbers, got {crash_centre!r}")
        self.crash_centre = centre

    def evaluate(self, x: torch.Tensor) -> RewardBatch:
        if x.ndim != 2 or x.shape[1] != 2:
            raise ValueError(f"TailReward2D expects samples of shape (n, 2), got {tuple(x.shape)}")
        r = tail_reward(
            x, failure_depth=self.failure_depth, peak_height=self.peak_height, peak_width=self.peak_width
        )
        valid = torch.isfinite(r.detach())
        errors = None
        if self.crash_radius > 0:
            centre = torch.as_tensor(self.crash_centre, dtype=x.dtype, device=x.device)
            crashed = ((x.detach() - centre) ** 2).sum(-1) < self.crash_radius**2
            r = torch.where(crashed, torch.full_like(r, float("nan")), r)
            valid = valid & ~crashed
            if bool(crashed.any()):
                errors = ["crash" if c else ("" if v else "nan") for c, v in zip(crashed.tolist(), valid.tolist())]
        if errors is None and not bool(valid.all()):
            errors = ["" if v else "nan" for v in valid.tolist()]
        return RewardBatch(r, valid, errors)

    def figures(self, out_dir: str | Path, base_x: np.ndarray, base_valid: np.ndarray, final_x: np.ndarray,
                final_valid: np.ndarray) -> list[Path]:
        """``samples.png``: base and fine-tuned samples side by side, coloured by this reward."""
        from rewards.plots import plot_samples

        rewards = []
        for x, valid in ((base_x, base_valid), (final_x, final_valid)):
            r = self.evaluate(torch.from_numpy(np.array(x, dtype=np.float64))).rewards.numpy()  # a writable copy
            rewards.append(np.where(np.asarray(valid, dtype=bool), r, np.nan))
        path = Path(out_dir) / "samples.png"
        plot_samples(path, np.asarray(base_x), np.asarray(final_x), rewards[0], rewards[1],
                     title="2-D task: base and fine-tuned samples")
        return [path]
