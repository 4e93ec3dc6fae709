"""Bonded-topology check: do the interatomic distances of a structure imply the molecule's graph?

Atoms i and j are read as bonded when d_ij < tolerance * (r_i + r_j), with r the covalent radii
(Å, RDKit periodic table). A structure is valid when the bonds read this way equal the molecular
graph exactly: no bond missing (stretched or broken) and no extra one (atoms crushed together), and
no bond collapsed: every bonded pair has d_ij >= min_ratio * (r_i + r_j).

Choice of the lower bound (default 0.6): at equilibrium every bond sits at a ratio of about 0.79
(triple bonds) to 1.09; 0.6 is a compression by a quarter of the shortest of them and by 40% of a
single bond, far beyond any thermal distortion: the nuclei overlap, and a semi-empirical energy there
means little. Generated structures cross it rarely but badly: 1 to 4 of 5,000 ethylene glycol samples per
seed of the molecule model, one of them otherwise valid at 568 kcal/mol above the reference
(`python -m benchmarks.collapsed_bonds`, `benchmarks/results/collapsed_bonds.md`). The upper test alone let such
structures through as valid molecules, and they dominated a left-tail CVaR. Strained bonds above the bound (a
C-H at 0.7 Å, say) stay valid: they are the same molecule at a high energy.

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

__all__ = ["BOND_MIN_RATIO", "BOND_TOLERANCE", "bonded_topology_ok", "distance_ratios"]

BOND_TOLERANCE = 1.3
BOND_MIN_RATIO = 0.6
_CHUNK = 1024  # samples per vectorised block, bounds memory to ~CHUNK * N^2 floats


def distance_ratios(coords: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """d_ij / (r_i + r_j) for structures (n, N, 3) and radii (N,) in Å -> (n, N, N)."""
    x = np.asarray(coords, dtype=np.float64)
    d = np.linalg.norm(x[:, :, None, :] - x[:, None, :, :], axis=-1)
    return d / (radii[:, None] + radii[None, :])


def bonded_topology_ok(
    coords: np.ndarray, smiles: str, tolerance: float = BOND_TOLERANCE, min_ratio: float = BOND_MIN_RATIO
) -> np.ndarray:
    """Which structures have exactly the bonded topology of ``smiles``.

    Args:
        coords: (n, N, 3) or flattened (n, 3 N) coordinates in Å, atom order of
            :func:`rewards.molecule.molecule.molecule_with_hydrogens`.
        smiles: the molecule.
        tolerance: bond threshold factor on the sum of covalent radii.
        min_ratio: the shortest a bond may be, as a factor on the sum of covalent radii (0: no bound).
    Returns:
        (n,) bool; False also for structures with non-finite coordinates. Raises ValueError if the
        array cannot be read as n structures of the molecule's N atoms.
    """
    if tolerance <= 0:
        raise ValueError(f"tolerance must be > 0, got {tolerance}")
    if not 0 <= min_ratio < tolerance:
        raise ValueError(f"min_ratio must be in [0, tolerance), got {min_ratio}")
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
        ratios = distance_ratios(x[idx], graph.covalent_radii)
        bonded = (ratios < tolerance) & off_diagonal
        collapsed = ((ratios < min_ratio) & graph.adjacency[None]).any(axis=(1, 2))
        ok[idx] = (bonded == graph.adjacency[None]).all(axis=(1, 2)) & ~collapsed
    return ok
