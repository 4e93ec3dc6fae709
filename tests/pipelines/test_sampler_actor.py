"""The bank's sampler pool (`pipelines.sampler_actor`): a sample is a function of (seed, label, id) alone.

Ray Data batches the ids of a resumed bank differently from an uninterrupted one (the missing shards' rows arrive
in other batches), so a sample must not depend on its batch. Checked without Ray: the actor called on one batch
and on the same ids split at arbitrary points (across noise chunks too) gives the same samples, for the SDE and
the ODE sampler; another label or seed gives other samples; the noise is standard normal.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.models import build_model
from pipelines.sampler_actor import CHUNK, SamplerActor, row_noise

MODEL = {"dim": 3, "hidden": 16, "depth": 2}


def _actor(kind: str, *, seed: int = 0, label: str = "base") -> SamplerActor:
    torch.manual_seed(0)
    state = build_model(MODEL).state_dict()
    sampler = {"kind": kind, "steps": 6, "grid": "uniform"}
    return SamplerActor([(MODEL, state)], sampler, seed, label, MODEL["dim"])


@pytest.mark.parametrize("kind", ["sde", "ode"])
def test_a_sample_does_not_depend_on_its_batch(kind):
    actor = _actor(kind)
    ids = np.arange(40, 40 + 3 * CHUNK + 7)
    whole = actor({"data": ids})
    cuts = [0, 5, CHUNK + 1, 2 * CHUNK + 30, len(ids)]
    parts = [actor({"data": ids[a:b]}) for a, b in zip(cuts, cuts[1:])]
    np.testing.assert_array_equal(np.concatenate([p["id"] for p in parts]), whole["id"])
    np.testing.assert_allclose(np.concatenate([p["x"] for p in parts]), whole["x"], rtol=0, atol=1e-5)
    shuffled = np.random.default_rng(1).permutation(ids)  # any order of ids in a batch
    again = actor({"data": shuffled})
    order = np.argsort(shuffled)
    np.testing.assert_allclose(again["x"][order], whole["x"], rtol=0, atol=1e-5)


def test_other_labels_and_seeds_draw_other_samples():
    ids = np.arange(10)
    base = _actor("sde")({"data": ids})["x"]
    assert np.abs(_actor("sde", label="final")({"data": ids})["x"] - base).min() > 1e-6
    assert np.abs(_actor("sde", seed=1)({"data": ids})["x"] - base).min() > 1e-6


def test_row_noise_is_standard_normal_and_independent_across_rows():
    x0, eps = row_noise(7, "base", np.arange(20 * CHUNK), 4, 3)
    draws = np.concatenate([x0.ravel(), eps.ravel()]).astype(np.float64)
    assert abs(draws.mean()) < 0.02 and abs(draws.std() - 1) < 0.02  # 20k draws: SE 0.007
    rows = x0[:, 0]
    assert abs(np.corrcoef(rows[:-1], rows[1:])[0, 1]) < 0.05  # neighbouring ids
    assert abs(np.corrcoef(rows[:-CHUNK], rows[CHUNK:])[0, 1]) < 0.05  # the same row of neighbouring chunks
