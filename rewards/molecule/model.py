"""The conformer model with a learnt correction onto the rest lengths, for ``model.target`` (README "Molecules").

``conformer_velocity(smiles, scale, ...)`` returns, on the molecule's sample space (displacements from
:func:`rewards.molecule.conformers.reference_structure` in ``scale`` Å units), the plain MLP plus a correction
towards the rest lengths of

- the bonds (kind 0), rest lengths those of the MMFF94-minimised reference structure;
- the 1-3 pairs (kind 1: two atoms bonded to a common one), which hold the bond angles;

each kind with its own learnt time-dependent rate. ``correction='projection'`` (default,
:class:`tfft.projection.ProjectingVelocity`): a fraction of the Gauss-Newton step that puts every pair at its rest
length; ``'force'`` (:class:`tfft.restoring.RestoringVelocity`): a step along the harmonic restoring force, whose
size the stiffest mode bounds.

Nothing else is molecule-specific: the pairs come from the SMILES's graph and the rest lengths from RDKit, so any
molecule that MMFF94 parameterises works by ``task.smiles`` alone.
"""

from __future__ import annotations

import numpy as np
import torch

from rewards.molecule.conformers import reference_structure
from rewards.molecule.molecule import molecular_graph
from rewards.molecule.relax import has_mmff_parameters, relax
from tfft.projection import ProjectingVelocity
from tfft.restoring import RestoringVelocity

__all__ = ["restoring_pairs", "conformer_velocity"]

_MINIMISE_STEPS = 2000
_CORRECTIONS = {"projection": ProjectingVelocity, "force": RestoringVelocity}


def restoring_pairs(smiles: str) -> tuple[np.ndarray, np.ndarray]:
    """The bonded and 1-3 atom pairs of ``smiles``: pairs (P, 2) int64 with i < j, kinds (P,) (0 bond, 1 angle)."""
    graph = molecular_graph(smiles)
    bonds = {tuple(int(a) for a in b) for b in graph.bonds}
    angles: set[tuple[int, int]] = set()
    for centre in range(graph.n_atoms):
        neighbours = np.flatnonzero(graph.adjacency[centre])
        for a in range(len(neighbours)):
            for b in range(a + 1, len(neighbours)):
                pair = (int(min(neighbours[a], neighbours[b])), int(max(neighbours[a], neighbours[b])))
                if pair not in bonds:
                    angles.add(pair)
    ordered = sorted(bonds) + sorted(angles)
    kinds = np.array([0] * len(bonds) + [1] * len(angles), dtype=np.int64)
    return np.array(ordered, dtype=np.int64).reshape(-1, 2), kinds


def conformer_velocity(smiles: str, scale: float, hidden: int = 256, depth: int = 3, time_features: int = 16,
                       floor: float = 0.02, initial_rate: float = 0.1,
                       correction: str = "projection") -> RestoringVelocity:
    """The velocity of ``smiles``'s conformers on its sample space (module docstring; the arguments as
    :class:`tfft.restoring.RestoringVelocity`). ``correction``: 'projection' (a learnt fraction of a Gauss-Newton
    step onto the rest lengths, :class:`tfft.projection.ProjectingVelocity`) or 'force' (a learnt step along the
    harmonic restoring force, bounded by its stiffest mode)."""
    if correction not in _CORRECTIONS:
        raise ValueError(f"model.kwargs.correction must be one of {sorted(_CORRECTIONS)}, got {correction!r}")
    reference = reference_structure(smiles)
    if not has_mmff_parameters(smiles):
        raise ValueError(f"MMFF94 has no parameters for {smiles!r}: the restoring forces take their rest lengths "
                         "from an MMFF94 minimum; use the plain MLP (remove model.target and model.kwargs)")
    minimised = relax(reference[None].astype(np.float64), smiles, _MINIMISE_STEPS)[0]
    pairs, kinds = restoring_pairs(smiles)
    rest = np.linalg.norm(minimised[pairs[:, 0]] - minimised[pairs[:, 1]], axis=-1)
    return _CORRECTIONS[correction](
        torch.tensor(np.array(reference).reshape(-1), dtype=torch.float32), torch.as_tensor(pairs),
        torch.as_tensor(rest, dtype=torch.float32), torch.ones(len(pairs)), torch.as_tensor(kinds),
        scale=float(scale), hidden=hidden, depth=depth, time_features=time_features, floor=floor,
        initial_rate=initial_rate)
