"""The pretraining data source: RDKit ETKDG conformers, centred and aligned to one reference.

``sample_conformers(n, seed)`` returns n structures of shape (3 N,) (Å, float32), embedded with
ETKDGv3 and deliberately NOT force-field minimised: the data keep the strain of raw distance-geometry
embeddings, so the base distribution has a real high-energy tail for fine-tuning to act on.

Frame: every structure is centred and Kabsch-rotated onto :func:`reference_structure`, one fixed
ETKDG embedding per SMILES (independent of ``seed``), so data sets drawn with different seeds share
one frame. Rotations are removed this way, rather than by an equivariant network, because the
velocity network is a plain MLP on flattened coordinates and the reward is rotation-invariant (see
:mod:`rewards.molecule.geometry`).

Seeds: RDKit's ``randomSeed=0`` made every conformer of an ``EmbedMultipleConfs`` call identical,
so the embedding seed is a non-zero 31-bit integer derived from (seed, round) by numpy's
SeedSequence. Embedding runs single-threaded, which keeps it deterministic for a seed.

Torsions: ETKDGv3's experimental-torsion and basic-knowledge terms pin the backbone of alanine
dipeptide near phi = -120° (1-99 % range about -128° to -111°) with psi = 0° or 180°; the data
then vary mostly in strain and methyl rotations, not in Ramachandran basin. ``embedder="KDG"`` (no
experimental-torsion terms) spreads phi and psi over most of the plane at the same cost; ``"ETDG"``
lies in between.

Filtering: embeddings that fail are skipped, and so are the rare degenerate ones (about 1 in 1000
for alanine dipeptide, hydrogens collapsed onto each other) whose distances do not reproduce the
bonded graph (:func:`rewards.molecule.topology.bonded_topology_ok`). Further rounds with fresh
seeds top the set up to n structures.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import numpy as np
from rdkit.Chem import rdDistGeom

from rewards.molecule.geometry import align_to, center
from rewards.molecule.molecule import (
    ALANINE_DIPEPTIDE,
    molecular_graph,
    molecule_with_hydrogens,
)
from rewards.molecule.topology import bonded_topology_ok

__all__ = ["embed_conformers", "embedding_seed", "reference_structure", "sample_conformers"]

# The seed of the reference structure's embedding (any fixed value; not tied to data seeds).
_REFERENCE_SEED = 2_718_281
_MAX_ROUNDS = 20
# RDKit embedding parameter sets by name.
EMBEDDERS: dict[str, Callable[[], rdDistGeom.EmbedParameters]] = {
    "ETKDGv3": rdDistGeom.ETKDGv3,
    "ETKDGv2": rdDistGeom.ETKDGv2,
    "ETDG": rdDistGeom.ETDG,
    "KDG": rdDistGeom.KDG,
}


def embedding_seed(seed: int, round_index: int = 0) -> int:
    """A non-zero RDKit ``randomSeed`` in [1, 2^31 - 1] derived from (seed, round_index)."""
    if seed < 0 or round_index < 0:
        raise ValueError(f"seed and round_index must be >= 0, got {seed}, {round_index}")
    (word,) = np.random.SeedSequence([int(seed), int(round_index)]).generate_state(1)
    return int(word) % (2**31 - 1) + 1


def _embed_round(smiles: str, count: int, random_seed: int, embedder: str) -> np.ndarray:
    """Raw embeddings of one RDKit call: (m, N, 3) with m <= count (failed ones are missing)."""
    mol = molecule_with_hydrogens(smiles)
    params = EMBEDDERS[embedder]()
    params.randomSeed = random_seed
    params.numThreads = 1
    ids = list(rdDistGeom.EmbedMultipleConfs(mol, numConfs=count, params=params))
    n_atoms = mol.GetNumAtoms()
    if not ids:
        return np.zeros((0, n_atoms, 3))
    return np.stack([mol.GetConformer(i).GetPositions() for i in ids])


def embed_conformers(smiles: str, n: int, seed: int, embedder: str = "ETKDGv3") -> np.ndarray:
    """n raw structures (n, N, 3) in Å with a valid bonded topology, as embedded (no frame).

    ``embedder`` names an RDKit parameter set (:data:`EMBEDDERS`). Raises RuntimeError naming the
    SMILES when repeated rounds cannot produce n structures.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if embedder not in EMBEDDERS:
        raise ValueError(f"embedder must be one of {sorted(EMBEDDERS)}, got {embedder!r}")
    n_atoms = molecular_graph(smiles).n_atoms
    found: list[np.ndarray] = []
    have = 0
    for round_index in range(_MAX_ROUNDS):
        if have >= n:
            break
        batch = _embed_round(smiles, n - have, embedding_seed(seed, round_index), embedder)
        batch = batch[bonded_topology_ok(batch, smiles)] if batch.shape[0] else batch
        found.append(batch)
        have += batch.shape[0]
    if have < n:
        raise RuntimeError(
            f"ETKDG produced only {have} of {n} valid conformers of {smiles!r} in {_MAX_ROUNDS} rounds"
        )
    if not found:
        return np.zeros((0, n_atoms, 3))
    return np.concatenate(found)[:n]


@lru_cache(maxsize=32)
def reference_structure(smiles: str = ALANINE_DIPEPTIDE) -> np.ndarray:
    """The alignment reference of ``smiles``: one centred ETKDGv3 structure (N, 3), Å, read-only.

    Fixed per SMILES (embedded with an internal constant seed), so every data set and every
    generated batch can be expressed in the same frame with :func:`rewards.molecule.geometry.align_to`.
    """
    ref = center(embed_conformers(smiles, 1, _REFERENCE_SEED)[0])
    ref.setflags(write=False)
    return ref


def to_sample_space(x: np.ndarray, smiles: str, scale: float | None) -> np.ndarray:
    """Å coordinates (n, 3 N) -> the model's sample space: unchanged when ``scale`` is None, else the
    displacement from :func:`reference_structure` in units of ``scale`` Å, z = (x - x_ref) / scale."""
    if scale is None:
        return x
    return (x - reference_structure(smiles).reshape(-1)) / float(scale)


def from_sample_space(z: np.ndarray, smiles: str, scale: float | None) -> np.ndarray:
    """Inverse of :func:`to_sample_space`: x = x_ref + scale * z (Å), shape (n, 3 N)."""
    if scale is None:
        return z
    return reference_structure(smiles).reshape(-1) + float(scale) * z


def sample_conformers(
    n: int, seed: int, *, smiles: str = ALANINE_DIPEPTIDE, embedder: str = "ETKDGv3", scale: float | None = None
) -> np.ndarray:
    """Draw n pretraining structures, shape (n, 3 N) float32, deterministically from ``seed``.

    Each is an unminimised embedding (ETKDGv3 unless ``embedder`` names another of
    :data:`EMBEDDERS`) with the molecule's bonded topology, centred and Kabsch-aligned (proper
    rotation) onto :func:`reference_structure`. Atom order as in
    :func:`rewards.molecule.molecule.molecule_with_hydrogens`. Units: Å when ``scale`` is None, else
    displacements from the reference in units of ``scale`` Å (:func:`to_sample_space`). With a plain
    MLP velocity the displacement form matters: on alanine dipeptide (5000 structures, 12k pretraining
    steps) absolute coordinates gave 1.0% of generated structures with the right bonds, displacements
    at scale 0.3 Å 98.7% (``python -m benchmarks.molecule_representation``).
    """
    if scale is not None and not scale > 0:
        raise ValueError(f"scale must be > 0 Å or None, got {scale}")
    raw = embed_conformers(smiles, n, seed, embedder)
    aligned = align_to(raw, reference_structure(smiles)) if n else raw
    flat = aligned.reshape(n, 3 * raw.shape[1])
    return to_sample_space(flat, smiles, scale).astype(np.float32)
