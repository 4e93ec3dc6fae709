"""A short MMFF94 relaxation of structures before they are scored (``XTBEnergy(relax_steps=...)``).

A generated structure's GFN-xTB energy mixes two things: which conformation it is (torsions, the ring of hydrogen
bonds), decided early along the sampler, and how exactly its bond lengths and angles sit, decided by the last steps'
noise (``benchmarks/results/molecule_heritability.md``: from t = 0.5 the reward's rank correlation is 0.13). A few
hundred force-field steps remove the second part: they move bonds and angles to their minimum, and the torsions
to the nearest minimum of their region (RDKit's MMFF94; from an unminimised embedding phi and psi move by tens of
degrees, `tests/rewards/test_molecule_xtb.py`), so the energy of the relaxed structure
scores the conformation. It is the usual way conformer generators are scored.

:func:`relax` takes structures in Å, (n, N, 3), and returns them relaxed; the topology check comes before it (a
structure with broken bonds is invalid, relaxed or not).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np
from rdkit.Chem import rdchem, rdForceFieldHelpers

from rewards.molecule.molecule import molecule_with_hydrogens

__all__ = ["relax", "has_mmff_parameters"]


@lru_cache(maxsize=8)
def _molecule(smiles: str) -> tuple[Any, Any]:
    """The molecule with one conformer to hold positions, and its MMFF94 properties."""
    mol = molecule_with_hydrogens(smiles)
    properties = rdForceFieldHelpers.MMFFGetMoleculeProperties(mol)
    if properties is None:
        raise ValueError(f"MMFF94 has no parameters for {smiles!r}")
    mol.AddConformer(rdchem.Conformer(mol.GetNumAtoms()), assignId=True)
    return mol, properties


def has_mmff_parameters(smiles: str) -> bool:
    """Whether MMFF94 parameterises every atom of ``smiles`` (callers check it up front and name their setting)."""
    try:
        _molecule(smiles)
    except ValueError:
        return False
    return True


def relax(coords: np.ndarray, smiles: str, steps: int) -> np.ndarray:
    """``steps`` iterations of MMFF94 minimisation of each structure; coords (n, N, 3) in Å -> (n, N, 3).

    Each structure is minimised from its own positions (RDKit's BFGS, at most ``steps`` iterations); the atom
    order is that of :func:`rewards.molecule.molecule.molecule_with_hydrogens`.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    mol, properties = _molecule(smiles)
    conformer = mol.GetConformer()
    out = np.empty_like(coords, dtype=np.float64)
    for k, structure in enumerate(np.asarray(coords, dtype=np.float64)):
        conformer.SetPositions(structure)
        field = rdForceFieldHelpers.MMFFGetMoleculeForceField(mol, properties)
        field.Minimize(maxIts=int(steps))
        out[k] = np.asarray(field.Positions(), dtype=np.float64).reshape(-1, 3)
    return out
