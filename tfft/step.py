"""What one solver step returns (`tfft.solvers`, `tfft.weighted`)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

__all__ = ["StepResult"]


@dataclass(frozen=True)
class StepResult:
    """One solver step: ``loss`` (scalar, attached) and ``metrics`` (name -> detached 0-dim tensor)."""

    loss: Tensor
    metrics: dict[str, Tensor]
