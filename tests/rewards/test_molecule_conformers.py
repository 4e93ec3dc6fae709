"""The pretraining data source: ETKDG conformers, deterministic per seed, diverse, centred, aligned."""

from __future__ import annotations

import numpy as np
import pytest

from rewards.molecule import (
    ALANINE_DIPEPTIDE,
    aligned_rmsd,
    bonded_topology_ok,
    mean_pairwise_rmsd,
    molecular_graph,
    reference_structure,
    rmsd,
    sample_conformers,
)
from rewards.molecule.conformers import embedding_seed


@pytest.fixture(scope="module")
def data() -> np.ndarray:
    return sample_conformers(64, 0)


def test_shape_dtype_and_determinism(data):
    assert data.shape == (64, 66) and data.dtype == np.float32
    np.testing.assert_array_equal(data, sample_conformers(64, 0))
    other = sample_conformers(64, 1)
    assert aligned_rmsd(data.reshape(-1, 22, 3), other.reshape(-1, 22, 3)).min() > 1e-3
    assert sample_conformers(0, 0).shape == (0, 66)


def test_embedding_seeds_are_nonzero_and_distinct():
    seeds = {embedding_seed(s, r) for s in range(20) for r in range(3)}
    assert len(seeds) == 60 and 0 not in seeds and max(seeds) < 2**31


def test_set_is_diverse_valid_centred_and_aligned(data):
    x = data.reshape(-1, 22, 3).astype(np.float64)
    assert mean_pairwise_rmsd(x) > 0.5  # Å; identical embeddings would give 0 (about 1.2 observed)
    assert bonded_topology_ok(x, ALANINE_DIPEPTIDE).all()
    np.testing.assert_allclose(x.mean(axis=1), 0.0, atol=1e-5)
    ref = reference_structure(ALANINE_DIPEPTIDE)
    np.testing.assert_allclose(ref.mean(axis=0), 0.0, atol=1e-12)
    # already in the reference frame: aligning again does not lower the RMSD
    np.testing.assert_allclose(aligned_rmsd(x, ref), rmsd(x, ref), atol=1e-4)


def test_default_molecule_is_one_enantiomer(data):
    """L-alanine: the signed volume at the alpha carbon has one sign in every structure (not racemic)."""
    g = molecular_graph(ALANINE_DIPEPTIDE)
    ca = 4
    neighbours = np.flatnonzero(g.adjacency[ca])
    x = data.reshape(-1, 22, 3).astype(np.float64)
    v = x[:, neighbours[:3]] - x[:, [ca]]
    volume = np.einsum("ij,ij->i", v[:, 0], np.cross(v[:, 1], v[:, 2]))
    assert (np.sign(volume) == np.sign(volume[0])).all()


def test_other_molecule_by_smiles_and_unknown_embedder():
    x = sample_conformers(10, 3, smiles="CCCC")
    assert x.shape == (10, 42)
    assert bonded_topology_ok(x, "CCCC").all()
    with pytest.raises(ValueError, match="embedder"):
        sample_conformers(2, 0, embedder="nope")
    with pytest.raises(ValueError, match="not-a-smiles"):
        sample_conformers(2, 0, smiles="not-a-smiles")
