"""The conditioning of the adjoint-matching regression (DESIGN.md section 6): running, stop-gradient statistics.

||sigma_k a_{k+1}|| is clipped per sample at a running high quantile of the non-zero targets, and optionally each
step's squared residual is divided by a running stop-gradient scale of ||sigma_k a_{k+1}||^2 / d. Both leave each
step's minimiser unchanged or nearly so; without them trajectories near a boundary between modes (huge adjoints)
and early steps (large sigma^2) carry the loss. The normalisation is off by default: dividing by sigma_k^2 moves
the gradient's weight onto the last steps, and on the 2-D task it fine-tuned markedly slower than the clipped,
unnormalised loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["Conditioning"]


@dataclass
class Conditioning:
    """Running, stop-gradient statistics that condition the regression (DESIGN.md section 6).

    For each step k, on the regression targets y = sigma_k a_{k+1} (n, d):
    - clip: ||y_i|| is capped at `clip_factor` c_k, c_k a running mean (decay `decay`) of the batch's
      `clip_quantile`-quantile of the non-zero ||y|| (0 disables; inactive samples of a tail objective have y = 0
      and do not count): only outliers are clipped, so the regression's targets keep their size;
    - normalise: the step's squared residual is divided by d s_k, s_k a running mean of the batch mean of
      ||y_clipped||^2 (off when `normalize` is False).
    The statistics start from the first batch that has a non-zero target at that step.

    Attributes:
        steps: K.
        normalize, clip_quantile, decay: the switches above.
        scale, clip: running s_k and c_k, (K,), NaN until seen.
    """

    steps: int
    normalize: bool = False
    clip_quantile: float = 0.9
    clip_factor: float = 2.0
    decay: float = 0.9
    scale: Tensor = field(default=None)  # type: ignore[assignment]
    clip: Tensor = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if not 0.0 <= self.clip_quantile <= 1.0:
            raise ValueError(f"clip_quantile must be in [0, 1] (0: no clipping), got {self.clip_quantile}")
        if not self.clip_factor >= 1.0:
            raise ValueError(f"clip_factor must be >= 1, got {self.clip_factor}")
        if not 0.0 <= self.decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {self.decay}")
        if self.scale is None:
            self.scale = torch.full((self.steps,), math.nan, dtype=torch.float64)
        if self.clip is None:
            self.clip = torch.full((self.steps,), math.nan, dtype=torch.float64)

    def _blend(self, name: str, rows: Tensor, batch: Tensor) -> Tensor:
        """Running mean `name` at `rows` updated with positive batch values; NaN entries start at the batch value."""
        running = getattr(self, name)
        if running.device != batch.device:  # the statistics live where the batch is: no host round trip
            running = running.to(batch.device)
            setattr(self, name, running)
        old = running[rows]
        new = torch.where(torch.isnan(old), batch, self.decay * old + (1.0 - self.decay) * batch)
        new = torch.where(batch > 0, new, old)
        running[rows] = new
        return new

    def apply(self, target: Tensor, step_indices: Tensor, weights: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Update the statistics with a batch and return (clipped target, per-step divisor (m,), clipped mask).

        Runs on the batch's device without a host synchronisation.

        Args:
            target: y = sigma_k a_{k+1}, (m, n, d) at the chosen steps.
            step_indices: the chosen k, (m,).
            weights: per-sample weights (n,), zero for samples that do not count.
        """
        m, n, d = target.shape
        device = target.device
        rows = step_indices.to(device)
        norms = target.detach().norm(dim=2).to(torch.float64)  # (m, n)
        counted = (weights > 0).to(device)
        clipped = torch.zeros(m, n, dtype=torch.bool, device=device)
        if self.clip_quantile > 0:
            # The quantile is over the non-zero targets only: in a tail objective most samples are inactive
            # (y = 0), and a quantile over all of them would clip the whole signal away. A step without any
            # gives NaN, then 0, which leaves its running value unchanged.
            signal = torch.where(counted[None, :] & (norms > 0), norms, torch.full_like(norms, math.nan))
            batch_q = torch.nan_to_num(torch.nanquantile(signal, self.clip_quantile, dim=1), nan=0.0)
            cap = self.clip_factor * self._blend("clip", rows, batch_q)  # (m,)
            cap = torch.where(torch.isnan(cap), torch.full_like(cap, math.inf), cap)
            over = norms > cap[:, None]
            clipped = over & counted[None, :]
            factor = torch.where(over, cap[:, None] / norms.clamp_min(1e-300), torch.ones_like(norms))
            target = target * factor.to(target.dtype)[:, :, None]
        divisor = torch.ones(m, dtype=torch.float64, device=device)
        if self.normalize:
            w = weights.detach().to(device=device, dtype=torch.float64)
            total = w.sum()
            energy = (target.detach().pow(2).sum(dim=2).to(torch.float64) * w).sum(dim=1) / total.clamp_min(1e-300) / d
            energy = torch.where(total > 0, energy, torch.zeros_like(energy))
            s = self._blend("scale", rows, energy)
            divisor = torch.where(torch.isnan(s) | (s <= 0), torch.ones_like(s), s)
        return target, divisor.to(dtype=target.dtype), clipped

    def state_dict(self) -> dict[str, Tensor]:
        """The running statistics (for checkpoints)."""
        return {"scale": self.scale.detach().cpu().clone(), "clip": self.clip.detach().cpu().clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore `state_dict()`; shapes must match K."""
        for name in ("scale", "clip"):
            value = torch.as_tensor(state[name], dtype=torch.float64)
            if value.shape != (self.steps,):
                raise ValueError(f"conditioning {name} has shape {tuple(value.shape)}, expected ({self.steps},)")
            setattr(self, name, value.clone())
