"""Molecular conformer generation: ETKDG data, GFN-xTB energy reward, validity and geometry tools.

A sample is one 3-D structure of a fixed molecule, flattened to (3 N,) in Å (RDKit atom order with
explicit hydrogens), centred and Kabsch-aligned to a reference structure. The default molecule is
alanine dipeptide (Ace-Ala-NMe, L-alanine, 22 atoms); any other is selected by SMILES.

Config example::

    reward:
      target: rewards.molecule:XTBEnergy
      kwargs: {smiles: "CC(=O)N[C@@H](C)C(=O)NC", method: GFN1-xTB}
    data source: rewards.molecule:sample_conformers (n, seed, smiles=...)
"""

from rewards.molecule.conformers import (
    embed_conformers,
    reference_structure,
    sample_conformers,
)
from rewards.molecule.geometry import (
    align_to,
    aligned_rmsd,
    backbone_phi_psi,
    center,
    dihedral,
    kabsch_rotations,
    mean_pairwise_rmsd,
    rmsd,
)
from rewards.molecule.molecule import (
    ALANINE_DIPEPTIDE,
    MolecularGraph,
    molecular_graph,
    molecule_with_hydrogens,
)
from rewards.molecule.topology import BOND_MIN_RATIO, BOND_TOLERANCE, bonded_topology_ok
from rewards.molecule.xtb import XTBEnergy

__all__ = [
    "ALANINE_DIPEPTIDE",
    "BOND_MIN_RATIO",
    "BOND_TOLERANCE",
    "MolecularGraph",
    "XTBEnergy",
    "align_to",
    "aligned_rmsd",
    "backbone_phi_psi",
    "bonded_topology_ok",
    "center",
    "dihedral",
    "embed_conformers",
    "kabsch_rotations",
    "mean_pairwise_rmsd",
    "molecular_graph",
    "molecule_with_hydrogens",
    "reference_structure",
    "rmsd",
    "sample_conformers",
]
