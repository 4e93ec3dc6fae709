"""A held-out check of weighted flow matching: is the model closer to the tilted target than the base model is?

The anchored weighted loss (`tfft.weighted.anchored_flow_matching_loss`) of a velocity field v is, per row i of
the bank, with u_i = x_i - x0 and x_t = t x_i + (1 - t) x0,

    l_i(v) = (rho_i - 1) || v(x_t, t) - u_i ||^2 + || v(x_t, t) - v_base(x_t, t) ||^2,

and its expectation L(v) = E[l(v)] equals E_{x_t}[ Z(x_t) || v - v* ||^2 ] + const with Z = E[rho | x_t] > 0 and
v* the velocity of the tilted law: L(base) - L(v) > 0 says that v is closer to v* than the base is, in that
weighted norm. On rows held out of training, with the times and noises drawn once, the per-row gains

    d_i = l_i(v_base) - l_i(v) = (rho_i - 1) (|| v_base - u_i ||^2 - || v - u_i ||^2) - || v - v_base ||^2

are independent across rows and their mean estimates L(base) - L(v) without the bias of the rows the model was fitted
to. The draws are common to every evaluation, so two checkpoints are compared on the same noise. `HoldOut.gain`
returns the mean and its standard error: the guard (`pipelines.guard`) keeps the best checkpoint by it, and the
starting state when no checkpoint's gain was above zero (the base's gain; no margin, the error is wide).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from tfft.conditions import call_velocity
from tfft.model import VelocityField

__all__ = ["HoldOut", "split_rows"]


def split_rows(n: int, fraction: float, *, seed: int) -> tuple[Tensor, Tensor]:
    """(training rows, held-out rows) of a bank of n rows: a random ``fraction`` held out, at least one row on
    each side; LongTensors, sorted. The same seed gives the same split (every DDP worker, every restart)."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    if n < 2:
        raise ValueError(f"a held-out split needs at least 2 rows, got {n}")
    k = min(max(round(n * fraction), 1), n - 1)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return torch.sort(order[k:]).values, torch.sort(order[:k]).values


@dataclass(frozen=True)
class HoldOut:
    """Held-out rows with their times, noises and base velocities drawn once (module docstring).

    Attributes:
        x_t: the interpolated points, (r n, d) (r draws per row, rows repeated r times).
        t: their times, (r n,).
        u: the targets x_i - x0, (r n, d).
        v_base: the base velocity at (x_t, t), (r n, d).
        base_error: || v_base - u ||^2, (r n,): the base's term, the same at every evaluation.
        rho: each row's relative tilt, (r n,).
        cond: the rows' condition indices, (r n,), or None.
        rows: n, the held-out rows; draws: r.
    """

    x_t: Tensor
    t: Tensor
    u: Tensor
    v_base: Tensor
    base_error: Tensor
    rho: Tensor
    cond: Tensor | None
    rows: int
    draws: int

    @classmethod
    def draw(
        cls, base: VelocityField, x1: Tensor, rho: Tensor, *, times: Tensor, noise: Tensor, cond: Tensor | None = None,
    ) -> HoldOut:
        """The check on rows x1 (n, d) with relative tilts rho (n,), times (r, n) and noises x0 (r, n, d).

        The base velocity is evaluated here once, without gradients.
        """
        r, n = times.shape
        if x1.dim() != 2 or rho.shape != (n,) or noise.shape != (r, *x1.shape) or x1.shape[0] != n:
            raise ValueError(
                f"expected x1 (n, d), rho (n,), times (r, n), noise (r, n, d); got {tuple(x1.shape)}, "
                f"{tuple(rho.shape)}, {tuple(times.shape)}, {tuple(noise.shape)}"
            )
        t = times.reshape(-1).to(x1)
        x0 = noise.reshape(-1, x1.shape[1]).to(x1)
        data = x1.repeat(r, 1)
        x_t = t[:, None] * data + (1.0 - t[:, None]) * x0
        c = None if cond is None else cond.repeat(r)
        with torch.no_grad():
            v_base = call_velocity(base, x_t, t, c)
        u, v_base = data - x0, v_base.to(x1.dtype)
        return cls(x_t, t, u, v_base, (v_base - u).pow(2).sum(dim=1), rho.to(x1).repeat(r), c, n, r)

    @torch.no_grad()
    def gains(self, model: VelocityField, *, chunk: int = 8192) -> Tensor:
        """d_i averaged over each row's draws, (n,) float64 (module docstring); ``chunk`` points per call."""
        total = torch.empty(self.t.shape[0], dtype=torch.float64, device=self.t.device)
        for start in range(0, self.t.shape[0], chunk):
            part = slice(start, start + chunk)
            c = None if self.cond is None else self.cond[part]
            v = call_velocity(model, self.x_t[part], self.t[part], c).to(self.u.dtype)
            to_data = (v - self.u[part]).pow(2).sum(dim=1)
            to_base = (v - self.v_base[part]).pow(2).sum(dim=1)
            total[part] = ((self.rho[part] - 1.0) * (self.base_error[part] - to_data) - to_base).to(torch.float64)
        return total.reshape(self.draws, self.rows).mean(dim=0)

    def gain(self, model: VelocityField) -> tuple[float, float]:
        """(mean gain, its standard error over the held-out rows): L(base) - L(model) on the held-out rows."""
        d = self.gains(model)
        se = float(d.std(unbiased=True) / d.numel() ** 0.5) if d.numel() > 1 else 0.0
        return float(d.mean()), se
