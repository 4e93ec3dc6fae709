"""What one solver step returns (`tfft.solvers`, `tfft.weighted`)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

__all__ = ["StepResult"]


@dataclass(frozen=True)
class StepResult:
    """One solver step: ``loss`` (scalar) and ``metrics`` (name -> detached 0-dim tensor).

    ``backpropagated``: the solver already accumulated the loss's gradient into the parameters' ``.grad``, a chunk
    of time steps at a time (`tfft.solvers.AdjointMatchingConfig.loss_chunk`); ``loss`` is then detached. Call
    :meth:`backward` rather than ``loss.backward()`` to handle both cases.
    """

    loss: Tensor
    metrics: dict[str, Tensor]
    backpropagated: bool = False

    def backward(self) -> None:
        """Accumulate d loss / d theta into ``.grad`` (nothing left to do when the step was backpropagated)."""
        if not self.backpropagated:
            self.loss.backward()
