"""The molecular graph and the bonded-topology validity check."""

from __future__ import annotations

import numpy as np
import pytest

from rewards.molecule import (
    ALANINE_DIPEPTIDE,
    BOND_MIN_RATIO,
    BOND_TOLERANCE,
    bonded_topology_ok,
    molecular_graph,
)
from rewards.molecule.conformers import embed_conformers
from rewards.molecule.topology import distance_ratios


@pytest.fixture(scope="module")
def raw_structures() -> np.ndarray:
    return embed_conformers(ALANINE_DIPEPTIDE, 300, seed=11)


def test_graph_of_alanine_dipeptide():
    g = molecular_graph(ALANINE_DIPEPTIDE)
    assert g.n_atoms == 22 and g.dim == 66
    assert g.bonds.shape == (21, 2)  # a tree: 22 atoms, 21 bonds
    counts = dict(zip(*np.unique(g.numbers, return_counts=True)))
    assert {int(z): int(c) for z, c in counts.items()} == {1: 12, 6: 6, 7: 2, 8: 2}  # H, C, N, O
    assert (g.adjacency == g.adjacency.T).all() and not g.adjacency.diagonal().any()
    assert set(np.round(g.covalent_radii, 2)) == {0.31, 0.76, 0.71, 0.66}


def test_invalid_smiles_is_named_in_the_error():
    with pytest.raises(ValueError, match="C1CC"):
        molecular_graph("C1CC")


def test_every_etkdg_structure_passes_and_the_tolerance_sits_in_the_gap(raw_structures):
    g = molecular_graph(ALANINE_DIPEPTIDE)
    assert bonded_topology_ok(raw_structures, ALANINE_DIPEPTIDE).all()
    ratios = distance_ratios(raw_structures, g.covalent_radii)
    off = ~np.eye(g.n_atoms, dtype=bool)
    assert ratios[:, g.adjacency].max() < 1.15 < BOND_TOLERANCE  # bonds: at most ~1.09 observed
    assert ratios[:, g.adjacency].min() > 0.8 > BOND_MIN_RATIO  # C=O at ~0.87
    # non-bonded: typically >= 1.55; rare ETKDG outliers with squeezed methyl hydrogens reach ~1.43
    assert ratios[:, off & ~g.adjacency].min() > 1.35 > BOND_TOLERANCE


def test_broken_bond_extra_bond_and_nan_fail_without_affecting_the_others(raw_structures):
    g = molecular_graph(ALANINE_DIPEPTIDE)
    x = raw_structures[:4].copy()
    i, j = g.bonds[0]
    x[0, j] = x[0, i] + 3.0 * (x[0, j] - x[0, i]) / np.linalg.norm(x[0, j] - x[0, i])  # bond at 3 Å
    p, q = np.argwhere(np.triu(~g.adjacency, 1) & (g.numbers[:, None] > 1) & (g.numbers[None] > 1))[0]
    x[1, q] = x[1, p] + 1.0 * (x[1, q] - x[1, p]) / np.linalg.norm(x[1, q] - x[1, p])  # non-bonded at 1 Å
    x[2, 5, 0] = np.nan
    ok = bonded_topology_ok(x, ALANINE_DIPEPTIDE)
    assert ok.tolist() == [False, False, False, True]
    assert bonded_topology_ok(x.reshape(4, -1), ALANINE_DIPEPTIDE).tolist() == ok.tolist()  # flat input


def test_a_collapsed_bond_fails(raw_structures):
    # A hydrogen pulled towards its carbon: valid down to 0.6 of the radii sum (1.07 Å for C-H), not below.
    g = molecular_graph(ALANINE_DIPEPTIDE)
    h, c = next((i, j) for i, j in g.bonds if g.numbers[i] == 1 or g.numbers[j] == 1)
    h, c = (h, c) if g.numbers[h] == 1 else (c, h)
    x = np.repeat(raw_structures[:1], 3, axis=0)
    unit = (x[0, h] - x[0, c]) / np.linalg.norm(x[0, h] - x[0, c])
    radii = g.covalent_radii[h] + g.covalent_radii[c]
    for k, ratio in enumerate((0.62, 0.55)):
        x[k, h] = x[k, c] + ratio * radii * unit
    assert bonded_topology_ok(x, ALANINE_DIPEPTIDE).tolist() == [True, False, True]
    assert bonded_topology_ok(x, ALANINE_DIPEPTIDE, min_ratio=0.0).tolist() == [True, True, True]
    with pytest.raises(ValueError, match="min_ratio"):
        bonded_topology_ok(x, ALANINE_DIPEPTIDE, min_ratio=1.5)


def test_wrong_atom_count_is_an_error():
    with pytest.raises(ValueError, match="shape"):
        bonded_topology_ok(np.zeros((2, 5, 3)), ALANINE_DIPEPTIDE)
