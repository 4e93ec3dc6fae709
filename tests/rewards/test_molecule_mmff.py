"""The MMFF94 screen of the conformer task: picklable, ranks like the xTB reward, failures named."""

from __future__ import annotations

import pickle

import numpy as np
import torch

from rewards.molecule.conformers import sample_conformers
from rewards.molecule.mmff import MMFFEnergy


def test_mmff_screen_scores_conformers_and_names_bad_samples():
    z = torch.as_tensor(sample_conformers(20, 3, scale=0.3).astype(np.float64))
    screen = pickle.loads(pickle.dumps(MMFFEnergy(scale=0.3)))
    out = screen(z)
    assert bool(out.valid.all()) and torch.isfinite(out.rewards).all() and out.errors is None
    # a stretched structure (every displacement x 20) has a far higher energy or broken bonds
    bad = torch.cat([z[:1] * 20.0, torch.full_like(z[:1], float("nan"))], dim=0)
    broken = screen(bad)
    assert broken.errors[1] == "malformed" and (broken.errors[0] == "topology" or broken.rewards[0] < out.rewards.min())
    assert screen(z[:, :5]).errors == ["malformed"] * 20
