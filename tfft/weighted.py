"""Weighted flow matching on a bank (DESIGN.md section 7), behind the solvers' ``step`` interface.

Two estimators of the same target p* ∝ q exp(g / gamma), q the base model's law:

- **plain** (``base=None``): draw bank rows by w_i ∝ exp(g(x_i) / gamma) and take the flow-matching loss on them.
  Its minimiser is the velocity of the *weighted bank*, a finite set of points, and its gradient at the base model
  is the full flow-matching noise of every row. Both move the model even where the tilt is flat: on alanine
  dipeptide, 1000 steps of it with *uniform* weights (a target equal to the base) lowered the right-CVaR(0.1)
  of the energy reward from -10.31 to -12.89 kcal/mol and the mean from -31.2 to -43.9 (lr 1e-3, cosine decay,
  batch 256; ``python -m benchmarks.weighted_anchor``, ``benchmarks/results/weighted_anchor.md``).
- **anchored** (``base`` given, the default in the pipeline): a control variate built from the base velocity,

      L(theta) = E_{i ~ bank, t, x0} [ (rho_i - 1) || v_theta(x_t, t) - u_i ||^2 + || v_theta(x_t, t) - v_base(x_t, t) ||^2 ],

  u_i = x_i - x0, x_t = t x_i + (1 - t) x0, rho_i = w_i / c with c the bank's median weight. Per x_t the
  minimiser solves Z v = E[rho u | x_t] - E[u | x_t] + v_base with Z = E[rho | x_t]; where the base velocity is
  its own law's flow-matching velocity (v_base = E[u | x_t]) this is v = E[rho u | x_t] / E[rho | x_t], the
  velocity of the tilted law p* exactly, for any c. Rows with rho = 1 (outside the CVaR tail, where g = 0: most of
  the bank) contribute only the anchor, whose gradient at v_theta = v_base is exactly zero, so the update is
  driven by the tilt alone; and wherever the base is not its samples' flow-matching velocity, the anchor keeps
  the base's velocity instead of refitting it to the bank. Every row's term is convex in v (its coefficient is
  rho_i > 0). Batches are stratified: the rows with rho != 1 get ``active_share`` of the batch (at least their
  share of the bank), each stratum weighted by its bank fraction, so the estimate of L stays unbiased.

With conditions (``bank_cond``, each row's condition index) every row's loss term uses its condition's velocity,
v(x_t, t, c_i), and the tilt weights are normalised within each condition to sum 1/C
(`tfft.conditions.per_condition_weights`): the plain estimator then draws from the mixture (1/C) sum_c p*_c. The
anchored estimator's rho is relative to its condition's median weight: the per-x_t minimiser above holds for each
condition separately with any per-condition constant, so each condition's rows outside the tail keep rho = 1.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from tfft.conditions import call_velocity, per_condition_weights
from tfft.holdout import HoldOut, split_rows
from tfft.model import VelocityField, flow_matching_loss
from tfft.solver_loops import unwrap
from tfft.step import StepResult

__all__ = ["WeightedFlowMatchingSolver", "anchored_flow_matching_loss", "draw_times"]


def anchored_flow_matching_loss(
    model: VelocityField,
    base: VelocityField,
    x1: Tensor,
    rho: Tensor,
    row_weights: Tensor,
    *,
    generator: torch.Generator | None = None,
    time_power: float = 1.0,
    cond: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The anchored (control-variate) weighted flow-matching loss on one batch (module docstring).

    Args:
        model: v_theta(x (n, d), t (n,)) -> (n, d); base: v_base, evaluated without gradient.
        x1: bank rows, (n, d); rho: their relative tilt w_i / c, (n,), positive.
        row_weights: the estimator's weight of each row, (n,) (stratum fraction / rows drawn from it).
        generator: for t (drawn first, (n,), :func:`draw_times`) and x0 ~ N(0, I) ((n, d)).
        time_power: t = u^(1 / time_power), u ~ U(0, 1) (:func:`draw_times`).
        cond: optional condition indices of the rows, (n,).

    Returns:
        (loss, delta_v): the weighted sum over rows of (rho - 1) ||v_theta - u||^2 + ||v_theta - v_base||^2
        (summed over dimensions, like the plain loss), and the weighted mean of ||v_theta - v_base||^2 (detached).
    """
    n = x1.shape[0]
    t = draw_times(n, time_power, generator=generator, device=x1.device, dtype=x1.dtype)
    x0 = torch.randn(x1.shape, generator=generator, device=x1.device, dtype=x1.dtype)
    x_t = t[:, None] * x1 + (1.0 - t[:, None]) * x0
    v = call_velocity(model, x_t, t, cond)
    with torch.no_grad():
        v_base = call_velocity(base, x_t, t, cond)
    to_base = (v - v_base).pow(2).sum(dim=1)
    to_data = (v - (x1 - x0)).pow(2).sum(dim=1)
    rho, row_weights = rho.to(v.dtype), row_weights.to(v.dtype)
    loss = (row_weights * ((rho - 1.0) * to_data + to_base)).sum()
    return loss, (row_weights * to_base).sum().detach()


def draw_times(
    n: int, time_power: float = 1.0, *, generator: torch.Generator | None = None, device: Any = None, dtype: Any = None
) -> Tensor:
    """n flow-matching times t = u^(1 / k), u ~ U(0, 1), k = ``time_power``: density k t^(k - 1) on (0, 1).

    The flow-matching loss is a sum of one regression per time t, each with the same minimiser v*(., t), so any
    positive density of t leaves the minimiser unchanged and only moves where the updates' effort goes. k > 1
    favours late times: where a tilt depends on fine detail of the samples (bond lengths of a molecule), the
    tilted and the base velocity differ only near t = 1, and early times add noise but no signal. k = 1: uniform.
    """
    if not time_power > 0:
        raise ValueError(f"time_power must be > 0, got {time_power}")
    u = torch.rand(n, generator=generator, device=device, dtype=dtype)
    return u if time_power == 1.0 else u.pow(1.0 / time_power)


class WeightedFlowMatchingSolver:
    """Weighted flow matching on a bank (module docstring): plain, or anchored on the base velocity.

    Args:
        model: v_theta.
        bank_x: bank samples, (N, d).
        bank_weights: non-negative tilt weights w_i ∝ exp(g(x_i) / gamma), (N,) (normalised here).
        base: the frozen base velocity; given, the anchored estimator is used.
        active_share: anchored only: the least share of each batch drawn from the rows with rho != 1.
        time_power: the density of the flow-matching times (:func:`draw_times`); 1: uniform.
        bank_cond: optional condition index of each bank row, (N,) (module docstring).
        holdout_fraction: anchored only: this fraction of the bank's rows is held out of training
            (`tfft.holdout.split_rows` with ``holdout_seed``) and checks the model (:meth:`holdout_gain`); 0: none.
        holdout_draws: the times and noises drawn once per held-out row for the check.

    ``step`` metrics: loss, weights_ess (ESS of the frozen weights), batch; anchored also delta_v (mean
    ||v_theta - v_base||^2 on the batch) and active_fraction (fraction of the training rows with rho != 1).
    """

    def __init__(
        self,
        model: VelocityField,
        bank_x: Tensor,
        bank_weights: Tensor,
        *,
        base: VelocityField | None = None,
        active_share: float = 0.5,
        time_power: float = 1.0,
        bank_cond: Tensor | None = None,
        holdout_fraction: float = 0.0,
        holdout_seed: int = 0,
        holdout_draws: int = 4,
    ) -> None:
        if bank_x.dim() != 2 or bank_weights.shape != (bank_x.shape[0],):
            raise ValueError(
                f"bank_x must be (N, d) and bank_weights (N,); got {tuple(bank_x.shape)}, {tuple(bank_weights.shape)}"
            )
        w = bank_weights.detach().to(torch.float64).cpu()
        if not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or not float(w.sum()) > 0:
            raise ValueError("bank_weights must be finite, non-negative and not all zero")
        if not time_power > 0:
            raise ValueError(f"time_power must be > 0, got {time_power}")
        self.time_power = float(time_power)
        if not 0.0 < active_share < 1.0:
            raise ValueError(f"active_share must be in (0, 1), got {active_share}")
        if bank_cond is not None and bank_cond.shape != (bank_x.shape[0],):
            raise ValueError(f"bank_cond must have shape ({bank_x.shape[0]},), got {tuple(bank_cond.shape)}")
        self.bank_cond = None if bank_cond is None else bank_cond.to(device=bank_x.device, dtype=torch.long)
        if bank_cond is None:
            w = w / w.sum()
        else:
            w = torch.as_tensor(per_condition_weights(w.numpy(), bank_cond.cpu().numpy()), dtype=torch.float64)
        self.model, self.bank_x, self.weights = model, bank_x, w
        self.ess = float(1.0 / self.weights.pow(2).sum())
        self.base, self.active_share = base, float(active_share)
        self.holdout: HoldOut | None = None
        if holdout_fraction and base is None:
            raise ValueError("holdout_fraction needs the anchored estimator (pass base)")
        if not 0.0 <= holdout_fraction < 1.0:
            raise ValueError(f"holdout_fraction must be in [0, 1), got {holdout_fraction}")
        if holdout_draws < 1:
            raise ValueError(f"holdout_draws must be >= 1, got {holdout_draws}")
        if base is not None:
            rho = self.weights / self._medians()
            self.rho = rho.to(bank_x.device)
            active = (rho - 1.0).abs() > 1e-9
            train = torch.ones_like(active)
            if holdout_fraction:
                train_rows, held = split_rows(len(rho), holdout_fraction, seed=holdout_seed)
                train = torch.zeros_like(active)
                train[train_rows] = True
                self.holdout = self.holdout_check(held, seed=holdout_seed + 1, draws=holdout_draws)
            self.train_rows = torch.nonzero(train).flatten()  # every row without a held-out part
            self.active_rows = torch.nonzero(active & train).flatten()
            self.rest_rows = torch.nonzero(~active & train).flatten()
            self.active_fraction = float(active[train].double().mean())

    def holdout_check(self, rows: Tensor, *, seed: int, draws: int) -> HoldOut:
        """The anchored loss's gain check (`tfft.holdout.HoldOut`) on bank ``rows``, ``draws`` times and noises per
        row drawn once from a CPU generator seeded ``seed`` (times by :func:`draw_times` with this solver's
        ``time_power``), then moved to the bank's device. The solver's own check is on its held-out rows."""
        if self.base is None:
            raise ValueError("the gain check needs the anchored estimator (pass base)")
        gen = torch.Generator().manual_seed(seed)
        x1 = self.bank_x[rows.to(self.bank_x.device)]
        times = draw_times(draws * len(rows), self.time_power, generator=gen, dtype=x1.dtype).reshape(draws, -1)
        noise = torch.randn((draws, *x1.shape), generator=gen, dtype=x1.dtype)
        cond = None if self.bank_cond is None else self.bank_cond[rows.to(self.bank_cond.device)]
        return HoldOut.draw(self.base, x1, self.rho[rows.to(self.rho.device)], times=times.to(x1.device),
                            noise=noise.to(x1.device), cond=cond)

    def holdout_gain(self) -> tuple[float, float] | None:
        """(mean, standard error) of L(base) - L(model) on the held-out rows (`tfft.holdout`); None without them."""
        if self.holdout is None:
            return None
        return self.holdout.gain(unwrap(self.model))  # inside a DDP wrapper: no hooks for a no-grad pass

    def _medians(self) -> Tensor:
        """Each row's reference weight c: the median positive weight of the bank, or of the row's condition."""
        if self.bank_cond is None:
            return self.weights[self.weights > 0].median()
        cond = self.bank_cond.cpu()
        reference = torch.ones_like(self.weights)
        for c in torch.unique(cond).tolist():
            rows = cond == c
            positive = self.weights[rows & (self.weights > 0)]
            if positive.numel():
                reference[rows] = positive.median()
        return reference

    def step(self, n: int, generator: torch.Generator | None = None, index_generator: torch.Generator | None = None) -> StepResult:
        """One batch of n bank rows; `index_generator` (CPU) draws the rows, `generator` t and x0."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if self.base is None:
            idx = torch.multinomial(self.weights, n, replacement=True, generator=index_generator)
            idx = idx.to(self.bank_x.device)
            x1 = self.bank_x[idx]
            t = draw_times(n, self.time_power, generator=generator, device=x1.device, dtype=x1.dtype)
            cond = None if self.bank_cond is None else self.bank_cond[idx]
            loss = flow_matching_loss(self.model, x1, generator=generator, t=t, cond=cond)
            extra: dict[str, float] = {}
        else:
            idx, row_weights = self._stratified(n, index_generator)
            idx = idx.to(self.bank_x.device)
            loss, delta_v = anchored_flow_matching_loss(
                self.model, self.base, self.bank_x[idx], self.rho[idx], row_weights.to(self.bank_x.device),
                generator=generator, time_power=self.time_power,
                cond=None if self.bank_cond is None else self.bank_cond[idx],
            )
            extra = {"delta_v": delta_v, "active_fraction": self.active_fraction}
        dtype, device = loss.dtype, loss.device
        metrics = {
            "loss": loss.detach(),
            "weights_ess": torch.tensor(self.ess, dtype=dtype, device=device),
            "batch": torch.tensor(float(n), dtype=dtype, device=device),
            **{k: torch.as_tensor(v, dtype=dtype, device=device) for k, v in extra.items()},
        }
        return StepResult(loss, metrics)

    def _stratified(self, n: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """Rows and their estimator weights: n_a from the rows with rho != 1, the rest from the others."""
        frac = self.active_fraction
        if not 0.0 < frac < 1.0 or n == 1:  # one stratum, or one row: uniform over the training rows
            idx = self.train_rows[torch.randint(0, len(self.train_rows), (n,), generator=generator)]
            return idx, torch.full((n,), 1.0 / n, dtype=torch.float64)
        n_a = min(max(round(n * max(frac, self.active_share)), 1), n - 1)
        a = self.active_rows[torch.randint(0, len(self.active_rows), (n_a,), generator=generator)]
        b = self.rest_rows[torch.randint(0, len(self.rest_rows), (n - n_a,), generator=generator)]
        weights = torch.cat([torch.full((n_a,), frac / n_a, dtype=torch.float64),
                             torch.full((n - n_a,), (1.0 - frac) / (n - n_a), dtype=torch.float64)])
        return torch.cat([a, b]), weights

    def state_dict(self) -> dict[str, Tensor]:
        """No running state."""
        return {}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Nothing to restore."""
        if state:
            raise ValueError(f"weighted flow matching has no state, got keys {sorted(state)}")
