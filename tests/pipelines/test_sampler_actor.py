"""The bank's sampler pool (`pipelines.sampler_actor`), without Ray: a batch's samples are a function of the seed,
the bank's label and the batch's ids; another label or seed draws other samples; the SDE and ODE samplers both
end at the flow model's samples of the right shape."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.models import build_model
from pipelines.sampler_actor import SamplerActor

MODEL = {"dim": 3, "hidden": 16, "depth": 2}


def _actor(kind: str, *, seed: int = 0, label: str = "base") -> SamplerActor:
    torch.manual_seed(0)
    state = build_model(MODEL).state_dict()
    return SamplerActor([(MODEL, state)], {"kind": kind, "steps": 6, "grid": "uniform"}, seed, label, MODEL["dim"])


@pytest.mark.parametrize("kind", ["sde", "ode"])
def test_a_batch_is_a_function_of_seed_label_and_ids(kind):
    ids = np.arange(40, 140)
    first = _actor(kind)({"data": ids})
    again = _actor(kind)({"data": ids})
    np.testing.assert_array_equal(first["id"], ids)
    assert first["x"].shape == (100, 3) and np.isfinite(first["x"]).all()
    np.testing.assert_array_equal(again["x"], first["x"])


def test_other_labels_and_seeds_draw_other_samples():
    ids = np.arange(10)
    base = _actor("sde")({"data": ids})["x"]
    assert np.abs(_actor("sde", label="final")({"data": ids})["x"] - base).min() > 1e-6
    assert np.abs(_actor("sde", seed=1)({"data": ids})["x"] - base).min() > 1e-6
