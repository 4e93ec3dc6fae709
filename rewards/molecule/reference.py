"""The "auto" reference energy: the lowest GFN-xTB energy over a fixed set of ETKDG conformers.

E_ref = min_k E(x_k) in kcal/mol over x_1..x_m = ``sample_conformers(m, seed, smiles=...)``. It turns
total energies (about -22 000 kcal/mol for alanine dipeptide) into small relative ones, so the reward
-(E - E_ref) is near 0 for the best unminimised data structures and negative for strained ones.

Computing it costs m single points (about 13 ms each for alanine dipeptide with GFN1-xTB on one
thread), so it is cached on disk as a small JSON file, keyed by a hash of everything that determines
its value: SMILES, method, electronic temperature, accuracy, m, seed and the tblite and RDKit
versions. The file is written to a temporary name and moved into place with ``os.replace``, so
concurrent reward actors racing on it never see a partial file; the last writer wins with the same
value.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import rdkit

from rewards.molecule.conformers import sample_conformers
from rewards.molecule.molecule import molecular_graph
from rewards.molecule.xtb_backend import XTBSettings, single_points, tblite_version

__all__ = ["compute_reference_energy", "reference_energy", "reference_key", "reference_path"]

_FORMAT = "1"


def reference_key(smiles: str, settings: XTBSettings, samples: int, seed: int) -> dict[str, Any]:
    """Everything the reference energy depends on, as a JSON-ready dict."""
    return {
        "format": _FORMAT,
        "smiles": smiles,
        "method": settings.method,
        "electronic_temperature": float(settings.electronic_temperature),
        "accuracy": float(settings.accuracy),
        "samples": int(samples),
        "seed": int(seed),
        "tblite": tblite_version(),
        "rdkit": rdkit.__version__,
    }


def reference_path(cache_dir: str | os.PathLike[str], key: dict[str, Any]) -> Path:
    """``<cache_dir>/xtb-reference-<hash>.json`` for a :func:`reference_key`."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return Path(os.path.expanduser(str(cache_dir))) / f"xtb-reference-{digest}.json"


def compute_reference_energy(smiles: str, settings: XTBSettings, samples: int, seed: int) -> float:
    """min over ``samples`` ETKDG conformers of the GFN-xTB energy, kcal/mol (no cache)."""
    if samples < 1:
        raise ValueError(f"reference_samples must be >= 1, got {samples}")
    graph = molecular_graph(smiles)
    x = sample_conformers(samples, seed, smiles=smiles).reshape(samples, graph.n_atoms, 3)
    energies = single_points(graph.numbers, x, settings).energy
    if not np.isfinite(energies).any():
        raise RuntimeError(
            f"no {settings.method} calculation converged on {samples} conformers of {smiles!r}"
        )
    return float(np.nanmin(energies))


def _read(path: Path, key: dict[str, Any]) -> float | None:
    try:
        payload = json.loads(path.read_text())
        value = float(payload["energy_kcal_mol"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return value if payload.get("key") == key and np.isfinite(value) else None


def _write(path: Path, key: dict[str, Any], value: float) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"key": key, "energy_kcal_mol": value}, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError as exc:
        warnings.warn(f"could not cache the reference energy at {path}: {exc}", stacklevel=3)
        tmp.unlink(missing_ok=True)


def reference_energy(
    smiles: str,
    settings: XTBSettings,
    samples: int,
    seed: int,
    cache_dir: str | os.PathLike[str] | None,
) -> float:
    """The auto reference energy (kcal/mol), read from or written to ``cache_dir`` (None: no cache)."""
    key = reference_key(smiles, settings, samples, seed)
    path = reference_path(cache_dir, key) if cache_dir is not None else None
    if path is not None:
        cached = _read(path, key)
        if cached is not None:
            return cached
    value = compute_reference_energy(smiles, settings, samples, seed)
    if path is not None:
        _write(path, key, value)
    return value
