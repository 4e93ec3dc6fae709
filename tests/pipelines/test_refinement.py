"""`pipelines.refinement.refine_threshold` without Ray: the Tilt it fine-tunes at and returns, with the banks stubbed.

The stubbed "fine-tuned model" never moves: its refinement banks are the exact N(0, 1) quantiles, so the tail
mass at eta is P(r > eta) and refinement must end at the 0.9-quantile for alpha 0.1 (right side).
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy.stats import norm

from pipelines import refinement
from pipelines.bankio import Bank
from pipelines.config import load_config
from tfft.objective import Tilt


def _bank(rewards: np.ndarray) -> Bank:
    n = len(rewards)
    return Bank(np.arange(n), np.zeros((n, 2)), rewards, np.ones(n, dtype=bool), np.full(n, "", dtype=object),
                np.zeros(n), np.ones(n, dtype=int), np.zeros(n, dtype=bool))


class _Run:
    def __init__(self) -> None:
        self.metrics: list[dict[str, float]] = []

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.metrics.append(metrics)


def test_refinement_fine_tunes_at_each_rounds_tilt_and_returns_the_refined_one(tmp_path):
    size = 20_000
    quantiles = norm.ppf((np.arange(size) + 0.5) / size)
    cfg = load_config(None, ["threshold.refine_rounds=8", f"threshold.refine_size={size}"])
    tuned: list[Tilt] = []
    dirs: list = []

    def finetune(out, tilt, init):
        tuned.append(tilt)
        dirs.append(out)
        return {"eta": torch.tensor(tilt.eta, dtype=torch.float64)}

    start = Tilt(0.0, "right", 0.1, 2.0)
    state, tilt, rounds = refinement.refine_threshold(
        cfg, tmp_path, SimpleNamespace(config={}), _bank(quantiles), start, {"eta": torch.tensor(0.0)},
        run=_Run(), finetune=finetune, log=lambda line: None,
        sample=lambda cfg, model, *, size, **kw: _bank(quantiles[:size]),
    )
    assert [r["round"] for r in rounds] == list(range(1, 9))
    assert all(t == start.with_eta(t.eta) for t in tuned)  # only eta changes between rounds
    assert tilt == tuned[-1] and float(state["eta"]) == tilt.eta  # the state fine-tuned at the returned tilt
    assert dirs[-1] == refinement.final_round_dir(tmp_path, rounds) == tmp_path / "refine" / "round-8"
    assert rounds[0]["eta"] == 0.0 and rounds[0]["tail_mass"] == pytest.approx(0.5, abs=1e-4)
    assert tilt.eta == pytest.approx(norm.ppf(0.9), abs=0.02)  # m(eta) = alpha at the 0.9-quantile
