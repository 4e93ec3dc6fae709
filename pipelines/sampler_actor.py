"""The bank's sampler pool: a Ray Data callable class that turns sample ids into samples of the flow model.

A batch's noise is a function of (``seed``, ``label``, the batch's first id): the start x0 and the SDE's Brownian
increments come from generators seeded by those three. Ray Data forms batches across shard boundaries, so a bank
resumed from some of its shards redraws the missing rows as valid samples of the model, but not as the same
samples an uninterrupted run would have drawn.

With a ``noise_key`` the noise is a function of each row instead (:func:`row_noise`): row i's start point and
increments depend on (``seed``, ``noise_key``, i) only, whatever the batches. Two banks with one key, of two
models, then share their noise row by row (common random numbers: the guard's paired check,
`pipelines.eval_guard`), and a resumed bank is the bank an uninterrupted run would have drawn.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import torch

__all__ = ["SamplerActor", "row_noise", "NOISE_CHUNK"]

NOISE_CHUNK = 16  # rows per generator of row_noise


def _seed_for(seed: int, label: str, first_id: int) -> int:
    digest = hashlib.sha256(f"{seed}:{label}:{first_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def row_noise(ids: np.ndarray, *, seed: int, key: str, dim: int, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Start points x0 (n, dim) and SDE increments (steps, n, dim) of rows ``ids`` (n,), each row's a function of
    (seed, key, id) alone: the rows of chunk c = id // NOISE_CHUNK come from one generator seeded by (seed, key, c),
    which draws the chunk's x0 (NOISE_CHUNK, dim) and then its increments (steps, NOISE_CHUNK, dim)."""
    ids = np.asarray(ids, dtype=np.int64)
    x0 = torch.empty(len(ids), dim)
    noise = torch.empty(steps, len(ids), dim)
    chunks = ids // NOISE_CHUNK
    for chunk in np.unique(chunks):
        rows = np.flatnonzero(chunks == chunk)
        gen = torch.Generator().manual_seed(_seed_for(seed, f"rows:{key}", int(chunk)))
        within = torch.as_tensor(ids[rows] - chunk * NOISE_CHUNK)
        x0[rows] = torch.randn(NOISE_CHUNK, dim, generator=gen)[within]
        if steps:
            noise[:, rows] = torch.randn(steps, NOISE_CHUNK, dim, generator=gen)[:, within]
    return x0, noise


class SamplerActor:
    """Ray Data callable class: ids -> samples from the flow model.

    Args:
        model: ``[ObjectRef]`` (or ``[(config, state_dict)]``) of the velocity network.
        sampler: dict with ``kind`` (sde | ode), ``steps`` and ``grid``.
        seed, label: the noise of a batch is a function of (seed, label, first id in the batch).
        per_condition: with conditions, the samples per condition (id i has condition i // per_condition);
            0 without conditions.
        noise_key: when set, each row's noise is a function of (seed, noise_key, id) (:func:`row_noise`).
    """

    def __init__(
        self, model: list[Any], sampler: dict[str, Any], seed: int, label: str, dim: int, use_gpu: bool = False,
        per_condition: int = 0, noise_key: str | None = None,
    ):
        import ray

        from pipelines.models import build_model

        payload = model[0]
        if isinstance(payload, ray.ObjectRef):
            payload = ray.get(payload)
        config, state = payload
        torch.set_num_threads(1)
        # a GPU only when the pool asked for one (Ray then sets CUDA_VISIBLE_DEVICES for this actor)
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.model = build_model(config, state).to(self.device).eval()
        self.sampler = dict(sampler)
        self.seed, self.label, self.dim = seed, label, dim
        self.per_condition = int(per_condition)
        self.noise_key = noise_key

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from tfft.sampling import sample_ode, sample_sde, time_grid

        ids = np.asarray(batch["data"], dtype=np.int64).reshape(-1)
        sde = self.sampler["kind"] == "sde"
        noise = None
        if self.noise_key is not None:
            x0, noise = row_noise(ids, seed=self.seed, key=self.noise_key, dim=self.dim,
                                  steps=int(self.sampler["steps"]) if sde else 0)
            x0, noise = x0.to(self.device), noise.to(self.device)
        else:
            gen = torch.Generator().manual_seed(_seed_for(self.seed, self.label, int(ids[0])))
            x0 = torch.randn(len(ids), self.dim, generator=gen).to(self.device)
        cond = None
        if self.per_condition:
            cond = torch.as_tensor(ids // self.per_condition, dtype=torch.long, device=self.device)
        with torch.no_grad():
            if sde and noise is not None:
                x1 = sample_sde(self.model, x0, int(self.sampler["steps"]), noise=noise, cond=cond)
            elif sde:
                sde_gen = torch.Generator(device=self.device).manual_seed(
                    _seed_for(self.seed + 1, self.label, int(ids[0]))
                )
                x1 = sample_sde(self.model, x0, int(self.sampler["steps"]), generator=sde_gen, cond=cond)
            else:
                grid = time_grid(int(self.sampler["steps"]), kind=self.sampler["grid"]).to(self.device)
                x1 = sample_ode(self.model, x0, grid, cond)
        out = {"id": ids, "x": x1.cpu().numpy().astype(np.float64)}
        if cond is not None:
            out["cond"] = cond.cpu().numpy().astype(np.int64)
        return out
