"""Rigid-body geometry of conformers: Kabsch alignment, RMSD, dihedrals, backbone detection."""

from __future__ import annotations

import numpy as np
import pytest
from rdkit.Chem import rdDistGeom
from rdkit.Chem.rdMolTransforms import GetDihedralDeg

from rewards.molecule import (
    ALANINE_DIPEPTIDE,
    align_to,
    aligned_rmsd,
    backbone_phi_psi,
    center,
    dihedral,
    kabsch_rotations,
    mean_pairwise_rmsd,
    molecule_with_hydrogens,
    rmsd,
)


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def test_rotated_and_translated_copies_align_back_to_zero_rmsd():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((22, 3)) * 2
    moved = np.stack([ref @ random_rotation(rng) + rng.standard_normal(3) * 5 for _ in range(8)])
    assert rmsd(moved, ref).min() > 0.5  # really moved
    np.testing.assert_allclose(aligned_rmsd(moved, ref), 0.0, atol=1e-10)
    np.testing.assert_allclose(align_to(moved, ref), np.broadcast_to(center(ref), moved.shape), atol=1e-10)


def test_kabsch_returns_proper_rotations_and_never_reflects():
    rng = np.random.default_rng(1)
    ref = rng.standard_normal((10, 3))
    mirror = ref * np.array([1.0, 1.0, -1.0])  # best fit would need a reflection
    rot = kabsch_rotations(np.stack([mirror, ref]), ref)
    np.testing.assert_allclose(np.linalg.det(rot), 1.0, atol=1e-10)
    eye = np.broadcast_to(np.eye(3), rot.shape)
    np.testing.assert_allclose(rot @ np.swapaxes(rot, -1, -2), eye, atol=1e-10)
    assert aligned_rmsd(mirror, ref) > 0.1  # a chiral point set stays distinguishable from its mirror image


def test_mean_pairwise_rmsd_is_zero_for_copies_and_deterministic_when_subsampled():
    rng = np.random.default_rng(2)
    ref = rng.standard_normal((6, 3))
    copies = np.stack([ref @ random_rotation(rng) for _ in range(5)])
    assert mean_pairwise_rmsd(copies) == pytest.approx(0.0, abs=1e-10)
    cloud = rng.standard_normal((60, 6, 3))
    a = mean_pairwise_rmsd(cloud, max_pairs=50, seed=3)
    assert a == mean_pairwise_rmsd(cloud, max_pairs=50, seed=3)
    assert a == pytest.approx(mean_pairwise_rmsd(cloud), rel=0.15)  # 50 of 1770 pairs: a fair estimate
    assert np.isnan(mean_pairwise_rmsd(cloud[:1]))


@pytest.mark.parametrize("angle", [0.0, 60.0, -60.0, 120.0, -150.0, 180.0])
def test_dihedral_of_a_hand_built_geometry(angle):
    """a=(1,0,0), b=0, c=(0,0,1), d=(cos t, sin t, 1): the IUPAC torsion a-b-c-d is t."""
    t = np.radians(angle)
    x = np.array([[1.0, 0, 0], [0, 0, 0], [0, 0, 1.0], [np.cos(t), np.sin(t), 1.0]])
    got = float(dihedral(x, (0, 1, 2, 3)))
    assert -180.0 <= got <= 180.0
    assert (got - angle + 180.0) % 360.0 - 180.0 == pytest.approx(0.0, abs=1e-9)  # equal modulo 360


def test_dihedral_matches_rdkit_and_backbone_quads_are_found():
    mol = molecule_with_hydrogens(ALANINE_DIPEPTIDE)
    residues = backbone_phi_psi(mol)
    assert residues is not None and len(residues) == 1
    (phi, psi), = residues
    symbols = [mol.GetAtomWithIdx(i).GetSymbol() for i in phi + psi]
    assert symbols == ["C", "N", "C", "C", "N", "C", "C", "N"]
    assert phi[1:] == psi[:3]  # N, CA, C are shared
    params = rdDistGeom.ETKDGv3()
    params.randomSeed = 5
    ids = list(rdDistGeom.EmbedMultipleConfs(mol, 3, params))
    coords = np.stack([mol.GetConformer(i).GetPositions() for i in ids])
    for k, i in enumerate(ids):
        for quad in (phi, psi):
            expected = GetDihedralDeg(mol.GetConformer(i), *quad)
            assert dihedral(coords, quad)[k] == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("smiles", ["CCO", "CCCC", "NC(C)C(=O)O"])
def test_molecules_without_a_capped_backbone_have_no_phi_psi(smiles):
    assert backbone_phi_psi(molecule_with_hydrogens(smiles)) is None
