"""Bonded-topology check: do the interatomic distances of a structure imply the molecule's graph?

Atoms i and j are read as bonded when d_ij < tolerance * (r_i + r_j), with r the covalent radii
(Å, RDKit periodic table). A structure is valid when the bonds read this way equal the molecular
graph exactly: no bond missing (stretched or broken) and no extra one (atoms crushed together).

Choice of the tolerance (default 1.3): over thousands of ETKDG conformers of alanine dipeptide the
ratio d_ij / (r_i + r_j) stays below about 1.09 for bonded pairs and above about 1.55 for nearly all
non-bonded pairs (the closest are geminal 1-3 pairs such as C-C-C or O=C-N). 1.3 sits near the
geometric middle of that gap, leaving roughly 20 % of slack on either side, so modest distortions of
a sample do not flip its validity while a real bond break or atom clash does. ETKDG occasionally
(about 1 to 2 per thousand embeddings) squeezes two hydrogens of a methyl group together: mildly
(ratio about 1.4 to 1.5, still valid and simply high in energy) or down to a fraction of an Å
(ratio < 1.3, an extra H-H "bond"); the data source discards the latter, see
:mod:`rewards.molecule.conformers`.
"""

from __future__ import annotations

import numpy as np

from rewards.molecule.molecule import molecular_graph

__all__ = ["BOND_TOLERANCE", "bonded_topology_ok", "distance_ratios"]

BOND_TOLERANCE = 1.3
_CHUNK = 1024  # samples per vectorised block, bounds memory to ~CHUNK * N^2 floats


def distance_ratios(coords: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """d_ij / (r_i + r_j) for structures (n, N, 3) and radii (N,) in Å -> (n, N, N)."""
    x = np.asarray(coords, dtype=np.float64)
    d = np.linalg.norm(x[:, :, None, :] - x[:, None, :, :], axis=-1)
    return d / (radii[:, None] + radii[None, :])


def bonded_topology_ok(
    coords: np.ndarray, smiles: str, tolerance: float = BOND_TOLERANCE
) -> np.ndarray:
    """Which structures have exactly the bonded topology of ``smiles``.

    Args:
        coords: (n, N, 3) or flattened (n, 3 N) coordinates in Å, atom order of
            :func:`rewards.molecule.molecule.molecule_with_hydrogens`.
        smiles: the molecule.
        tolerance: bond threshold factor on the sum of covalent radii.
    Returns:
        (n,) bool; False also for structures with non-finite coordinates. Raises ValueError if the
        array cannot be read as n structures of the molecule's N atoms.
    """
    if tolerance <= 0:
        raise ValueError(f"tolerance must be > 0, got {tolerance}")
    graph = molecular_graph(smiles)
    x = np.asarray(coords, dtype=np.float64)
    if x.ndim == 2 and x.shape[1] == graph.dim:
        x = x.reshape(x.shape[0], graph.n_atoms, 3)
    if x.ndim != 3 or x.shape[1:] != (graph.n_atoms, 3):
        raise ValueError(
            f"expected coordinates of shape (n, {graph.n_atoms}, 3) or (n, {graph.dim}) for "
            f"{smiles!r}, got {x.shape}"
        )
    ok = np.zeros(x.shape[0], dtype=bool)
    finite = np.isfinite(x).all(axis=(1, 2))
    off_diagonal = ~np.eye(graph.n_atoms, dtype=bool)
    rows = np.flatnonzero(finite)
    for start in range(0, rows.shape[0], _CHUNK):
        idx = rows[start : start + _CHUNK]
        bonded = (distance_ratios(x[idx], graph.covalent_radii) < tolerance) & off_diagonal
        ok[idx] = (bonded == graph.adjacency[None]).all(axis=(1, 2))
    return ok
