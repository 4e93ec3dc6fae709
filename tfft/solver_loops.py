"""The adjoint solver's two loops, the SDE sampler and the lean adjoint: CUDA graphs or eager.

On the fast path on CUDA, `AdjointMatchingSolver` (`tfft.solvers`) replays each loop as a CUDA graph
(`tfft.graphs`), captured once per shape: the sampler per (n, d, dtype, device), the adjoint per row bucket
(`tfft.graphs.bucket_rows`). Everywhere else, and from the first failed capture on (a model with host syncs or
dynamic shapes), it runs the eager `tfft.sampling.sample_sde` and `tfft.adjoint.lean_adjoint`, which compute
the same numbers. With conditions both loops run eagerly: the captures are unconditional.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from tfft.adjoint import Adjoint, lean_adjoint
from tfft.graphs import GraphedAdjoint, GraphedSampler, bucket_rows, graphs_available
from tfft.model import VelocityField
from tfft.sampling import Trajectory, sample_sde

__all__ = ["SolverLoops", "unwrap"]


def unwrap(model: VelocityField) -> VelocityField:
    """The module inside a DistributedDataParallel wrapper (no-grad calls need no gradient hooks or broadcasts)."""
    inner = getattr(model, "module", None)
    return inner if isinstance(inner, torch.nn.Module) else model


class SolverLoops:
    """The sampler and the lean adjoint of one solver, with their CUDA-graph captures.

    Args:
        model: v_theta (may be a DDP wrapper: the sampler calls the module inside it without gradients, the
            wrapper only at the steps kept attached).
        base: v_base (frozen), the adjoint's base drift.
        steps: K, the SDE steps.
        offset: the SDE's offset h (None: 1/K).
        fast: the solver's fast path (`AdjointMatchingConfig.fast`); False: never a CUDA graph.
        adjoint_chunk: rows per vector-Jacobian product of the adjoint (0: all rows at once).
    """

    def __init__(
        self, model: VelocityField, base: VelocityField, *, steps: int, offset: float | None, fast: bool,
        adjoint_chunk: int = 0,
    ) -> None:
        self.model, self.base, self.steps, self.offset, self.fast = model, base, steps, offset, fast
        self.adjoint_chunk = adjoint_chunk
        self.samplers: dict[tuple[Any, ...], GraphedSampler] = {}
        self.adjoints: dict[tuple[Any, ...], GraphedAdjoint] = {}
        self.graph_error: str | None = None

    def graphs(self, x: Tensor) -> bool:
        """Whether the loops on tensors like x run as CUDA graphs (fast path, CUDA, a module, no failed capture)."""
        return (
            self.fast and self.graph_error is None and graphs_available(x.device)
            and isinstance(unwrap(self.model), torch.nn.Module)
        )

    def _capture_failed(self, error: Exception) -> None:
        """A model that cannot be captured (host syncs, dynamic shapes) runs eagerly; say so once."""
        self.graph_error = f"{type(error).__name__}: {error}"
        warnings.warn(f"CUDA-graph capture failed, the solver runs its loops eagerly: {self.graph_error}", stacklevel=3)
        torch.cuda.synchronize()

    def sample(self, x0: Tensor, noise: Tensor, grad_steps: Tensor | None, cond: Tensor | None = None) -> Trajectory:
        """The SDE trajectory from x0 (n, d) with increments noise (K, n, d) (`tfft.sampling.sample_sde`).

        grad_steps (m,): the steps whose v_theta stays attached (eager only); cond (n,): condition indices.
        """
        if self.graphs(x0) and grad_steps is None and cond is None:
            key = (tuple(x0.shape), x0.dtype, x0.device)
            try:
                if key not in self.samplers:
                    self.samplers[key] = GraphedSampler(
                        unwrap(self.model), x0.shape[0], x0.shape[1], self.steps, offset=self.offset,
                        device=x0.device, dtype=x0.dtype,
                    )
                return self.samplers[key](x0, noise)
            except RuntimeError as error:
                self._capture_failed(error)
        traj = sample_sde(
            unwrap(self.model), x0, self.steps, offset=self.offset, noise=noise, return_trajectory=True,
            grad_steps=grad_steps, grad_velocity=self.model, cond=cond,
        )
        assert isinstance(traj, Trajectory)
        return traj

    def adjoint(self, traj: Trajectory, terminal: Tensor, capacity: int) -> Adjoint:
        """The lean adjoint of traj (K + 1, n, d) from a_K = terminal (n, d) (`tfft.adjoint.lean_adjoint`);
        capacity: the most rows a call may have (the pool size), which sets the row buckets."""
        if not self.graphs(terminal) or traj.cond is not None:
            return lean_adjoint(self.base, traj, terminal, chunk=self.adjoint_chunk)
        rows = bucket_rows(terminal.shape[0], capacity)
        key = (rows, terminal.shape[1], terminal.dtype, terminal.device)
        try:
            if key not in self.adjoints:
                self.adjoints[key] = GraphedAdjoint(
                    self.base, rows, terminal.shape[1], self.steps, offset=traj.offset,
                    device=terminal.device, dtype=terminal.dtype, chunk=self.adjoint_chunk,
                )
            return self.adjoints[key](traj.xs, terminal)
        except RuntimeError as error:
            self._capture_failed(error)
            return lean_adjoint(self.base, traj, terminal, chunk=self.adjoint_chunk)
