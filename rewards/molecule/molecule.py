"""The molecular graph of a SMILES string: atoms, bonds and covalent radii, cached per SMILES.

Atom order everywhere in this package is RDKit's order after ``Chem.AddHs(Chem.MolFromSmiles(s))``:
the heavy atoms in SMILES order, then the hydrogens. A flattened structure is the (N, 3) coordinate
array in that order, in Ångström, reshaped to (3 N,).

The default molecule is alanine dipeptide (Ace-Ala-NMe, 22 atoms with H). Its SMILES fixes the
α-carbon to the natural L configuration (CIP label S): with the stereocentre left unspecified, ETKDG
embeds either enantiomer at random, giving a 50/50 racemic data set whose two halves no proper
rotation can superimpose (and a mirror-symmetrised Ramachandran plot). The atom order is the same as
for the unspecified SMILES ``CC(=O)NC(C)C(=O)NC``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from rdkit import Chem

__all__ = ["ALANINE_DIPEPTIDE", "MolecularGraph", "molecular_graph", "molecule_with_hydrogens"]

ALANINE_DIPEPTIDE = "CC(=O)N[C@@H](C)C(=O)NC"


@dataclass(frozen=True)
class MolecularGraph:
    """Static description of one molecule (all arrays read-only).

    Attributes:
        smiles: the SMILES it was built from.
        numbers: (N,) int64 atomic numbers.
        bonds: (B, 2) int64 bonded atom pairs (i < j), sorted.
        covalent_radii: (N,) float64 covalent radii in Å (RDKit periodic table).
        adjacency: (N, N) bool, True for bonded pairs (symmetric, False on the diagonal).
    """

    smiles: str
    numbers: np.ndarray
    bonds: np.ndarray
    covalent_radii: np.ndarray
    adjacency: np.ndarray

    @property
    def n_atoms(self) -> int:
        """N, the number of atoms including hydrogens."""
        return int(self.numbers.shape[0])

    @property
    def dim(self) -> int:
        """3 N, the length of a flattened structure."""
        return 3 * self.n_atoms


@lru_cache(maxsize=32)
def _cached_molecule(smiles: str) -> Chem.Mol:
    mol = Chem.MolFromSmiles(smiles)
    if mol is None:
        raise ValueError(f"RDKit cannot parse the SMILES {smiles!r}")
    return Chem.AddHs(mol)


def molecule_with_hydrogens(smiles: str) -> Chem.Mol:
    """A fresh copy of the RDKit molecule of ``smiles`` with explicit hydrogens, no conformers.

    Raises ValueError naming the SMILES when RDKit cannot parse it. The parsed molecule is cached;
    the copy may be modified (for example by embedding conformers into it).
    """
    if not isinstance(smiles, str) or not smiles.strip():
        raise ValueError(f"SMILES must be a non-empty string, got {smiles!r}")
    return Chem.Mol(_cached_molecule(smiles))


def _frozen(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


@lru_cache(maxsize=32)
def molecular_graph(smiles: str) -> MolecularGraph:
    """The :class:`MolecularGraph` of ``smiles`` (with hydrogens); cached per SMILES string."""
    mol = molecule_with_hydrogens(smiles)
    table = Chem.GetPeriodicTable()
    numbers = np.array([atom.GetAtomicNum() for atom in mol.GetAtoms()], dtype=np.int64)
    radii = np.array([table.GetRcovalent(int(z)) for z in numbers], dtype=np.float64)
    pairs = sorted(
        (min(b.GetBeginAtomIdx(), b.GetEndAtomIdx()), max(b.GetBeginAtomIdx(), b.GetEndAtomIdx()))
        for b in mol.GetBonds()
    )
    bonds = np.array(pairs, dtype=np.int64).reshape(-1, 2)
    adjacency = np.zeros((numbers.shape[0],) * 2, dtype=bool)
    adjacency[bonds[:, 0], bonds[:, 1]] = True
    adjacency[bonds[:, 1], bonds[:, 0]] = True
    return MolecularGraph(
        smiles=smiles,
        numbers=_frozen(numbers),
        bonds=_frozen(bonds),
        covalent_radii=_frozen(radii),
        adjacency=_frozen(adjacency),
    )
