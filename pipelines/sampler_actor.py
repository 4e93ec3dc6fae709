"""The bank's sampler pool: a Ray Data callable class that turns sample ids into samples of the flow model.

Every sample's noise is a function of (``seed``, ``label``, its id) alone: the start x0 (d,) and, for the SDE, the
Brownian increments eps (K, d) come from the generator of the sample's fixed chunk of ids (:func:`row_noise`). So a sample is
the same whichever batch Ray Data puts it in: a bank built in one go and a bank resumed from some of its shards
(whose missing rows Ray Data batches differently) hold the same samples, row for row, up to the floating-point
effects of the batch size on the network's matrix products.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import torch

__all__ = ["SamplerActor", "row_noise", "CHUNK"]


CHUNK = 64  # ids per noise generator: id i's noise is row i % CHUNK of its chunk i // CHUNK


def _seed_for(seed: int, label: str, chunk: int) -> int:
    digest = hashlib.sha256(f"{seed}:{label}:{chunk}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def row_noise(seed: int, label: str, ids: np.ndarray, dim: int, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """The start noise x0 (n, dim) and the SDE increments eps (steps, n, dim), float32, of the samples ``ids``
    (n,); ``steps`` 0 gives eps of shape (0, n, dim).

    The ids are cut into fixed chunks of :data:`CHUNK` (chunk c holds ids c * CHUNK ... (c + 1) * CHUNK - 1), each
    with its own generator seeded by (seed, label, c), which draws the whole chunk's x0 and eps; id i takes row
    i % CHUNK. A sample's noise is thus a function of (seed, label, id) alone, whatever batch it arrives in.
    """
    ids = np.asarray(ids, dtype=np.int64)
    x0 = np.empty((len(ids), dim), dtype=np.float32)
    eps = np.empty((steps, len(ids), dim), dtype=np.float32)
    chunks = ids // CHUNK
    for chunk in np.unique(chunks).tolist():
        rng = np.random.default_rng(_seed_for(seed, label, chunk))
        chunk_x0 = rng.standard_normal((CHUNK, dim), dtype=np.float32)
        chunk_eps = rng.standard_normal((steps, CHUNK, dim), dtype=np.float32)
        here = np.flatnonzero(chunks == chunk)
        rows = ids[here] % CHUNK
        x0[here] = chunk_x0[rows]
        eps[:, here] = chunk_eps[:, rows]
    return x0, eps


class SamplerActor:
    """Ray Data callable class: ids -> samples from the flow model.

    Args:
        model: ``[ObjectRef]`` (or ``[(config, state_dict)]``) of the velocity network.
        sampler: dict with ``kind`` (sde | ode), ``steps`` and ``grid``.
        seed, label: a sample's noise is a function of (seed, label, its id) (:func:`row_noise`).
        per_condition: with conditions, the samples per condition (id i has condition i // per_condition);
            0 without conditions.
    """

    def __init__(
        self, model: list[Any], sampler: dict[str, Any], seed: int, label: str, dim: int, use_gpu: bool = False,
        per_condition: int = 0,
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

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from tfft.sampling import sample_ode, sample_sde, time_grid

        ids = np.asarray(batch["data"], dtype=np.int64).reshape(-1)
        sde = self.sampler["kind"] == "sde"
        steps = int(self.sampler["steps"])
        x0, eps = row_noise(self.seed, self.label, ids, self.dim, steps if sde else 0)
        x0 = torch.from_numpy(x0).to(self.device)
        cond = None
        if self.per_condition:
            cond = torch.as_tensor(ids // self.per_condition, dtype=torch.long, device=self.device)
        with torch.no_grad():
            if sde:
                x1 = sample_sde(self.model, x0, steps, noise=torch.from_numpy(eps).to(self.device), cond=cond)
            else:
                grid = time_grid(steps, kind=self.sampler["grid"]).to(self.device)
                x1 = sample_ode(self.model, x0, grid, cond)
        out = {"id": ids, "x": x1.cpu().numpy().astype(np.float64)}
        if cond is not None:
            out["cond"] = cond.cpu().numpy().astype(np.int64)
        return out
