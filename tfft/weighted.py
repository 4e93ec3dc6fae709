"""Weighted flow matching on a bank (DESIGN.md section 7), behind the solvers' ``step`` interface."""

from __future__ import annotations

import torch
from torch import Tensor

from tfft.model import VelocityField, flow_matching_loss
from tfft.step import StepResult

__all__ = ["WeightedFlowMatchingSolver"]


class WeightedFlowMatchingSolver:
    """Weighted flow matching on a bank (DESIGN.md section 7): each step draws n bank samples with probabilities
    w_i ∝ exp(g(x_i) / gamma) (with replacement) and takes the plain flow-matching loss on them, whose expectation
    is the weighted loss sum_i w_i || v_theta(x_t, t) - (x_i - x0) ||^2.

    Args:
        model: v_theta.
        bank_x: bank samples, (N, d).
        bank_weights: non-negative weights, (N,) (normalised here).

    ``step`` metrics: loss, weights_ess (ESS of the frozen weights), batch.
    """

    def __init__(self, model: VelocityField, bank_x: Tensor, bank_weights: Tensor) -> None:
        if bank_x.dim() != 2 or bank_weights.shape != (bank_x.shape[0],):
            raise ValueError(
                f"bank_x must be (N, d) and bank_weights (N,); got {tuple(bank_x.shape)}, {tuple(bank_weights.shape)}"
            )
        w = bank_weights.detach().to(torch.float64).cpu()
        if not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or not float(w.sum()) > 0:
            raise ValueError("bank_weights must be finite, non-negative and not all zero")
        self.model, self.bank_x, self.weights = model, bank_x, w / w.sum()
        self.ess = float(1.0 / self.weights.pow(2).sum())

    def step(self, n: int, generator: torch.Generator | None = None, index_generator: torch.Generator | None = None) -> StepResult:
        """Flow-matching loss on n bank samples drawn by weight; `index_generator` (CPU) draws the rows."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        idx = torch.multinomial(self.weights, n, replacement=True, generator=index_generator)
        x1 = self.bank_x[idx.to(self.bank_x.device)]
        loss = flow_matching_loss(self.model, x1, generator=generator)
        dtype, device = loss.dtype, loss.device
        metrics = {
            "loss": loss.detach(),
            "weights_ess": torch.tensor(self.ess, dtype=dtype, device=device),
            "batch": torch.tensor(float(n), dtype=dtype, device=device),
        }
        return StepResult(loss, metrics)

    def state_dict(self) -> dict[str, Tensor]:
        """No running state."""
        return {}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Nothing to restore."""
        if state:
            raise ValueError(f"weighted flow matching has no state, got keys {sorted(state)}")
