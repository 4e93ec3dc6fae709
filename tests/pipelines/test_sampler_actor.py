"""The bank's sampler pool (`pipelines.sampler_actor`), without Ray: a batch's samples are a function of the seed,
the bank's label and the batch's ids; another label or seed draws other samples; the SDE and ODE samplers both
end at the flow model's samples of the right shape."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.models import build_model
from pipelines.sampler_actor import SamplerActor, row_noise

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


@pytest.mark.parametrize("kind", ["sde", "ode"])
def test_with_a_noise_key_each_row_is_its_own_whatever_the_batches(kind):
    """Row noise (`row_noise`): the rows of one batch equal the same rows drawn in other batches, under any label;
    another key draws other rows; two models with one key share each row's start point and increments."""
    torch.manual_seed(0)
    state = build_model(MODEL).state_dict()

    def actor(key: str, label: str = "final", weights: dict | None = None) -> SamplerActor:
        return SamplerActor([(MODEL, weights or state)], {"kind": kind, "steps": 6, "grid": "uniform"}, 0, label,
                            MODEL["dim"], noise_key=key)

    whole = actor("k")({"data": np.arange(5, 45)})["x"]
    parts = [actor("k", label="check")({"data": ids})["x"] for ids in (np.arange(5, 18), np.arange(18, 45))]
    np.testing.assert_array_equal(np.concatenate(parts), whole)
    assert np.abs(actor("other")({"data": np.arange(5, 45)})["x"] - whole).min() > 1e-6
    x0, noise = row_noise(np.array([3, 17, 40]), seed=0, key="k", dim=3, steps=6)
    x0b, noiseb = row_noise(np.array([40, 3]), seed=0, key="k", dim=3, steps=6)
    assert torch.equal(x0[[2, 0]], x0b) and torch.equal(noise[:, [2, 0]], noiseb) and noise.shape == (6, 3, 3)
    # a nearby model (every weight moved by 1e-3) under the same key: each row moves a little, not to a new draw
    nearby = {k: v + 1e-3 for k, v in state.items()}
    moved = np.abs(actor("k", weights=nearby)({"data": np.arange(5, 45)})["x"] - whole).max()
    assert 0 < moved < 0.05 * np.abs(whole).mean()
