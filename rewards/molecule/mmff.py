"""A cheap screen for the conformer reward: minus the MMFF94 force-field energy (RDKit), in kcal/mol.

Same sample space as :class:`rewards.molecule.xtb.XTBEnergy`: a sample is a flattened structure (3 N,) in Å, or,
with ``scale``, a displacement from the reference structure in units of ``scale`` Å. Its screen value is

    s(x) = -E_MMFF94(x),

with no reference offset (only the ranking matters to screened evaluation, `pipelines.screening`). A force-field
energy costs about 10 µs per structure against tens of milliseconds for a GFN-xTB single point, and ranks the
strain of raw embeddings much as xTB does. A sample that is malformed or whose distances break the bonded topology
is invalid here too ('malformed' / 'topology'): screened evaluation then ranks it first, so the expensive reward
records its failure exactly as without a screen.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from rdkit.Chem import rdchem
from rdkit.Chem import rdForceFieldHelpers

from rewards.base import Reward, RewardBatch
from rewards.molecule.conformers import from_sample_space
from rewards.molecule.molecule import ALANINE_DIPEPTIDE, molecular_graph, molecule_with_hydrogens
from rewards.molecule.topology import BOND_TOLERANCE, bonded_topology_ok

__all__ = ["MMFFEnergy"]


class MMFFEnergy(Reward):
    """s(x) = -E_MMFF94(x) in kcal/mol for samples x (n, 3 N) (module doc); no gradients.

    Args:
        smiles: the molecule (default alanine dipeptide).
        scale: None for Å coordinates, else displacements from the reference structure in ``scale`` Å units.
        tolerance: bond threshold factor of the topology check (as :class:`XTBEnergy`).
        variant: 'MMFF94' or 'MMFF94s'.
    """

    name = "mmff_energy"
    version = "2"  # 2: collapsed bonds are invalid (rewards.molecule.topology.BOND_MIN_RATIO)
    differentiable = False

    def __init__(self, smiles: str = ALANINE_DIPEPTIDE, scale: float | None = None, tolerance: float = BOND_TOLERANCE,
                 variant: str = "MMFF94"):
        self.graph = molecular_graph(smiles)  # raises ValueError naming an invalid SMILES
        if variant not in ("MMFF94", "MMFF94s"):
            raise ValueError(f"variant must be 'MMFF94' or 'MMFF94s', got {variant!r}")
        if scale is not None and not scale > 0:
            raise ValueError(f"scale must be > 0 Å or None, got {scale}")
        self.smiles, self.variant, self.tolerance = smiles, variant, float(tolerance)
        self.scale = None if scale is None else float(scale)
        self._field: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_field": None}  # the RDKit force field is rebuilt where it is used

    def _force_field(self) -> Any:
        if self._field is None:
            mol = molecule_with_hydrogens(self.smiles)
            properties = rdForceFieldHelpers.MMFFGetMoleculeProperties(mol, mmffVariant=self.variant)
            if properties is None:
                raise ValueError(f"MMFF94 has no parameters for {self.smiles!r}")
            mol.AddConformer(rdchem.Conformer(mol.GetNumAtoms()), assignId=True)
            self._field = (mol, rdForceFieldHelpers.MMFFGetMoleculeForceField(mol, properties))
        return self._field[1]

    def evaluate(self, x: torch.Tensor) -> RewardBatch:
        z = x.detach().cpu().numpy().astype(np.float64)
        n = z.shape[0]
        values = np.full(n, np.nan)
        if z.ndim != 2 or z.shape[1] != self.graph.dim:
            errors = ["malformed"] * n
        else:
            coords = from_sample_space(z, self.smiles, self.scale)
            finite = np.isfinite(coords).all(axis=1)
            topology = np.zeros(n, dtype=bool)
            if finite.any():
                topology[finite] = bonded_topology_ok(coords[finite], self.smiles, self.tolerance)
            errors = ["" if ok else ("topology" if f else "malformed") for ok, f in zip(topology, finite)]
            field = self._force_field()
            for k in np.flatnonzero(topology):
                values[k] = -field.CalcEnergy(coords[k].tolist())
            bad = topology & ~np.isfinite(values)
            errors = [("nan" if b else e) for e, b in zip(errors, bad)]
        valid = torch.as_tensor([not e for e in errors], dtype=torch.bool)
        return RewardBatch(torch.as_tensor(values, dtype=torch.float64), valid, None if bool(valid.all()) else errors)

    def __repr__(self) -> str:
        return f"MMFFEnergy(smiles={self.smiles!r}, scale={self.scale}, variant={self.variant!r})"
