"""CUDA-graph captures of the SDE sampler and the lean adjoint: their K-step loops replayed in one launch.

On a GPU a small velocity network is bound by kernel launches and host work, not arithmetic: the K-step sampler
and the K vector-Jacobian products of the adjoint launch a few thousand small kernels per training step. A CUDA
graph records those launches once for fixed shapes and replays them with one call. The captured functions are the
eager `tfft.sampling.sample_sde` and `tfft.adjoint.lean_adjoint` themselves, so both paths compute the same
numbers; tests compare them.

Rules the captures rely on (all kept by the solver):
- shapes are fixed per capture: the sampler per batch size n, the adjoint per row bucket (`bucket_rows`); rows
  beyond the real ones are padded with zeros, and a zero terminal adjoint stays zero, so padding cannot leak;
- the network's parameters are updated in place (optimisers do) and never reallocated;
- every tensor a graph reads is owned by the capture object (static inputs, time grid), so that its memory
  cannot be freed and reused between replays;
- the outputs live in the graph's memory and are overwritten by the next replay: use them before calling again;
- the captures are unconditional: with conditions (``cond``) the solver runs the eager loops instead;
- the Brownian increments are drawn outside the graph (one `randn` of shape (K, n, d)), so a seeded generator
  gives the same trajectory with and without graphs.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor

from tfft.adjoint import Adjoint, lean_adjoint
from tfft.model import VelocityField
from tfft.sampling import Trajectory, check_sde_arguments, sample_sde, time_grid

__all__ = ["GraphedAdjoint", "GraphedSampler", "bucket_rows", "graphs_available"]


def graphs_available(device: torch.device | str) -> bool:
    """True when `device` is a CUDA device and CUDA graphs can be captured on it."""
    return torch.device(device).type == "cuda" and torch.cuda.is_available()


def bucket_rows(rows: int, capacity: int, buckets: int = 8) -> int:
    """The padded row count for `rows` active rows out of `capacity`: the next multiple of ceil(capacity/buckets).

    At most `buckets` distinct sizes (so at most that many adjoint captures per batch size), at most
    capacity / buckets padded rows each.
    """
    if not 0 < rows <= capacity:
        raise ValueError(f"rows must be in [1, {capacity}], got {rows}")
    quantum = -(-capacity // buckets)
    return min(capacity, -(-rows // quantum) * quantum)


def _uncached_autocast() -> Any:
    """The caller's CUDA autocast state with autocast's weight cache off, for a warm-up and a capture.

    Inside one autocast region, autocast casts a trainable weight to the low dtype once and reuses that copy.
    A copy made in the warm-up would be read by the captured graph at its address (the cast itself is not
    captured): the replays would use the weights of the capture, not the optimiser's updates, and read freed
    memory once the region ends and clears its cache. Without the cache the cast kernels are part of the graph.
    (A model that opens its own autocast region turns the cache back on inside it: `_capture` also clears the
    cache between the warm-up and the capture.)
    """
    if not torch.is_autocast_enabled("cuda"):
        return nullcontext()
    return torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False)


def _capture(fn: Callable[[], Any]) -> tuple[torch.cuda.CUDAGraph, Any]:
    """Warm `fn` up on a side stream (allocator and library handles), then capture it; returns (graph, output)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with _uncached_autocast():
        with torch.cuda.stream(stream):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        torch.clear_autocast_cache()  # a model's own nested autocast region may have cached a warm-up cast
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fn()
        torch.clear_autocast_cache()  # copies made in the capture live in the graph's memory: not for eager code
    return graph, out


class GraphedSampler:
    """`sample_sde(velocity, x0, steps, noise=..., return_trajectory=True)` captured for n samples of dimension d.

    Args:
        velocity: v(x (n, d), t (n,)); its parameters must stay at the same addresses between replays.
        n, d: batch shape.
        steps: K.
        offset: the SDE's offset (None: 1 / K).
        device, dtype: where the capture runs (a CUDA device).
    """

    def __init__(
        self, velocity: VelocityField, n: int, d: int, steps: int, *, offset: float | None = None,
        device: torch.device | str = "cuda", dtype: torch.dtype = torch.float32,
    ) -> None:
        if not graphs_available(device):
            raise ValueError(f"CUDA graphs need a CUDA device, got {device!r}")
        self.x0 = torch.zeros((n, d), device=device, dtype=dtype)
        self.offset = check_sde_arguments(self.x0, steps, offset)
        self.noise = torch.zeros((steps, n, d), device=device, dtype=dtype)

        def run() -> Trajectory:
            out = sample_sde(velocity, self.x0, steps, offset=self.offset, noise=self.noise, return_trajectory=True)
            assert isinstance(out, Trajectory)
            return out

        self.graph, self.trajectory = _capture(run)

    def __call__(self, x0: Tensor, noise: Tensor) -> Trajectory:
        """Replay with start points x0 (n, d) and increments noise (K, n, d); the result is overwritten next call."""
        if x0.shape != self.x0.shape or noise.shape != self.noise.shape:
            raise ValueError(
                f"captured for x0 {tuple(self.x0.shape)} and noise {tuple(self.noise.shape)}; "
                f"got {tuple(x0.shape)} and {tuple(noise.shape)}"
            )
        self.x0.copy_(x0)
        self.noise.copy_(noise)
        self.graph.replay()
        return self.trajectory


class GraphedAdjoint:
    """`lean_adjoint(base, trajectory, terminal)` captured for `rows` samples (padded with zeros when fewer).

    Args:
        base: the frozen v_base.
        rows, d: the captured batch shape (a bucket from `bucket_rows`).
        steps, offset: K and the SDE's offset of the trajectories it will receive.
        device, dtype: where the capture runs (a CUDA device).
        chunk: rows per vector-Jacobian product (`lean_adjoint`'s ``chunk``; 0: all rows at once).
    """

    def __init__(
        self, base: VelocityField, rows: int, d: int, steps: int, *, offset: float,
        device: torch.device | str = "cuda", dtype: torch.dtype = torch.float32, chunk: int = 0,
    ) -> None:
        if not graphs_available(device):
            raise ValueError(f"CUDA graphs need a CUDA device, got {device!r}")
        self.rows = rows
        self.xs = torch.zeros((steps + 1, rows, d), device=device, dtype=dtype)
        self.terminal = torch.zeros((rows, d), device=device, dtype=dtype)
        # Kept as an attribute: the graph reads its time grid by address, so it must outlive the capture.
        self.trajectory = Trajectory(
            xs=self.xs, ts=time_grid(steps, device=device, dtype=dtype), h=1.0 / steps, offset=offset
        )
        self.graph, self.adjoint = _capture(lambda: lean_adjoint(base, self.trajectory, self.terminal, chunk=chunk))

    def __call__(self, xs: Tensor, terminal: Tensor) -> Adjoint:
        """Replay on states xs (K + 1, r, d) and terminal a_K (r, d), r <= rows; returns views of the first r rows."""
        r = xs.shape[1]
        if r > self.rows or xs.shape[0] != self.xs.shape[0] or terminal.shape != (r, self.xs.shape[2]):
            raise ValueError(
                f"captured for states {tuple(self.xs.shape)}; got {tuple(xs.shape)} and terminal {tuple(terminal.shape)}"
            )
        self.xs[:, :r].copy_(xs)
        self.terminal[:r].copy_(terminal)
        if r < self.rows:
            self.xs[:, r:].zero_()
            self.terminal[r:].zero_()
        self.graph.replay()
        return Adjoint(states=self.adjoint.states[:, :r], base_velocities=self.adjoint.base_velocities[:, :r])
