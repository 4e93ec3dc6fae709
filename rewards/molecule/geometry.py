"""Rigid-body geometry of conformers (pure numpy): centring, Kabsch alignment, RMSD, dihedrals.

Why alignment instead of equivariance: the flow's velocity network is a plain MLP on the flattened
coordinates (3 N,), so it is not rotation-equivariant and would waste capacity learning the uniform
distribution over orientations. The reward (an energy) is invariant to rigid motions, so nothing is
lost by removing them from the data: every structure is centred (mean atom position at the origin)
and rotated onto one reference structure by the Kabsch algorithm. The network then models internal
degrees of freedom in a single, consistent frame.

Kabsch: for centred P, Q of shape (N, 3), the proper rotation R (det R = +1) minimising
||P R - Q||_F is R = U diag(1, 1, s) Vᵀ, where P^T Q = U Σ Vᵀ and s = sign det(U Vᵀ).
All functions accept batches; shapes are given per function. Lengths are in Å, angles in degrees.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from rdkit import Chem

__all__ = [
    "align_to",
    "aligned_rmsd",
    "backbone_phi_psi",
    "center",
    "dihedral",
    "kabsch_rotations",
    "mean_pairwise_rmsd",
    "rmsd",
]

# A backbone dihedral is defined by four atom indices.
Quad = tuple[int, int, int, int]

# phi: C(=O)-N-CA-C(=O); match indices 0:C 1:O 2:N 3:CA 4:C 5:O.
_PHI_SMARTS = "[CX3](=O)[NX3][CX4][CX3]=O"
_PHI_ATOMS = (0, 2, 3, 4)
# psi: N-CA-C(=O)-N; match indices 0:N 1:CA 2:C 3:O 4:N.
_PSI_SMARTS = "[NX3][CX4][CX3](=O)[NX3]"
_PSI_ATOMS = (0, 1, 2, 4)


def center(x: np.ndarray) -> np.ndarray:
    """Subtract the mean atom position: (..., N, 3) -> (..., N, 3) (unweighted centroid at 0)."""
    x = np.asarray(x, dtype=np.float64)
    return x - x.mean(axis=-2, keepdims=True)


def kabsch_rotations(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Proper rotations R with centred p @ R ≈ centred q.

    Args:
        p: (..., N, 3) structures to rotate.
        q: (..., N, 3) targets, broadcast against ``p`` (e.g. one (N, 3) reference).
    Returns:
        (..., 3, 3) rotation matrices with det = +1 (reflections are excluded).
    """
    pc, qc = center(p), center(q)
    h = np.swapaxes(pc, -1, -2) @ qc  # (..., 3, 3) = P^T Q
    u, _, vt = np.linalg.svd(h)
    sign = np.sign(np.linalg.det(u @ vt))
    sign = np.where(sign == 0, 1.0, sign)
    u = u.copy()
    u[..., :, 2] *= sign[..., None]  # U diag(1, 1, s) Vᵀ
    return u @ vt


def align_to(x: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Centre ``x`` (..., N, 3) and rotate it onto ``reference`` (N, 3); returns (..., N, 3).

    The result lives in the frame of the centred reference.
    """
    return center(x) @ kabsch_rotations(x, reference)


def rmsd(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Root-mean-square atom displacement without any alignment: (..., N, 3) pairs -> (...,) in Å."""
    d = np.asarray(x, dtype=np.float64) - np.asarray(y, dtype=np.float64)
    return np.sqrt((d**2).sum(-1).mean(-1))


def aligned_rmsd(x: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """RMSD after optimal superposition (centring + Kabsch): (..., N, 3) vs (..., N, 3) -> (...,)."""
    return rmsd(align_to(x, reference), center(reference))


def mean_pairwise_rmsd(x: np.ndarray, *, max_pairs: int = 2000, seed: int = 0) -> float:
    """Mean aligned RMSD over pairs of distinct structures in ``x`` (n, N, 3); a diversity measure (Å).

    Uses all n (n - 1) / 2 pairs when there are at most ``max_pairs`` of them, otherwise
    ``max_pairs`` pairs drawn deterministically from ``seed``. Returns NaN when n < 2.
    """
    x = np.asarray(x, dtype=np.float64)
    n = x.shape[0]
    if n < 2:
        return float("nan")
    i, j = np.triu_indices(n, k=1)
    if i.shape[0] > max_pairs:
        rng = np.random.default_rng(seed)
        pick = rng.choice(i.shape[0], size=max_pairs, replace=False)
        i, j = i[pick], j[pick]
    return float(aligned_rmsd(x[i], x[j]).mean())


def dihedral(x: np.ndarray, atoms: Sequence[int]) -> np.ndarray:
    """Dihedral angle of four atoms (a, b, c, d) in degrees, in (-180, 180].

    x: (..., N, 3) -> (...,). IUPAC sign: looking along b -> c, the angle is positive when the
    bond b-a must turn clockwise to eclipse c-d. Computed as atan2(|b2| b1·n2, n1·n2) with
    b1 = b - a, b2 = c - b, b3 = d - c, n1 = b1×b2, n2 = b2×b3.
    """
    a, b, c, d = (int(k) for k in atoms)
    x = np.asarray(x, dtype=np.float64)
    b1 = x[..., b, :] - x[..., a, :]
    b2 = x[..., c, :] - x[..., b, :]
    b3 = x[..., d, :] - x[..., c, :]
    n1 = np.cross(b1, b2)
    n2 = np.cross(b2, b3)
    y = np.linalg.norm(b2, axis=-1) * (b1 * n2).sum(-1)
    cos_part = (n1 * n2).sum(-1)
    return np.degrees(np.arctan2(y, cos_part))


def _matches(mol: Chem.Mol, smarts: str, atoms: Quad) -> list[Quad]:
    pattern = Chem.MolFromSmarts(smarts)
    found = mol.GetSubstructMatches(pattern)
    return [(int(m[atoms[0]]), int(m[atoms[1]]), int(m[atoms[2]]), int(m[atoms[3]])) for m in found]


def backbone_phi_psi(mol: Chem.Mol) -> list[tuple[Quad, Quad]] | None:
    """Backbone (phi, psi) atom quadruples of a peptide, one pair per residue that has both.

    phi = C(=O)-N-CA-C and psi = N-CA-C(=O)-N, found by SMARTS; the two quadruples of a residue
    share its α-carbon (CA). Returns a list ordered by CA index, or None when the molecule has no
    residue with both angles defined (a non-peptide, or a single amino acid without caps).
    """
    phis = {q[2]: q for q in _matches(mol, _PHI_SMARTS, _PHI_ATOMS)}
    psis = {q[1]: q for q in _matches(mol, _PSI_SMARTS, _PSI_ATOMS)}
    residues = sorted(set(phis) & set(psis))
    if not residues:
        return None
    return [(phis[ca], psis[ca]) for ca in residues]
