"""Single-point GFN-xTB energies and analytic gradients with tblite, in kcal/mol and Å.

tblite works in atomic units: positions in Bohr, energy in Hartree, gradient dE/dR in Hartree/Bohr.
This module converts at the boundary:

    R_bohr = R_Å / 0.529177210903
    E_kcal = 627.509474 * E_Ha
    dE/dR_Å [kcal/mol/Å] = 627.509474 / 0.529177210903 * dE/dR_bohr [Ha/Bohr]

Threads: tblite parallelises with OpenMP. In this process the OpenMP runtime is the one torch loaded
first (same ``libgomp.so.1`` soname), already initialised when tblite is imported, so setting
``OMP_NUM_THREADS`` at that point has no effect. Instead every call runs inside
:func:`openmp_threads`, which sets the runtime's thread count (``omp_set_num_threads``) for the
calculation and restores it afterwards. The default is 1 thread (``OMP_NUM_THREADS`` when the user
set it), because the pipeline scales out with one reward actor per core.

Each structure gets a fresh calculator and a fresh SCF guess, so a result never depends on the other
structures of the batch. Nothing tblite-owned outlives a call (rewards must stay picklable).
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

__all__ = [
    "BOHR_TO_ANGSTROM",
    "HARTREE_TO_KCAL_MOL",
    "KELVIN_TO_HARTREE",
    "METHODS",
    "SinglePoints",
    "XTBSettings",
    "default_thread_count",
    "openmp_threads",
    "single_points",
    "tblite_version",
]

HARTREE_TO_KCAL_MOL = 627.509474
BOHR_TO_ANGSTROM = 0.529177210903
KELVIN_TO_HARTREE = 3.166808578545117e-6  # Boltzmann constant in Hartree / K
METHODS = ("GFN1-xTB", "GFN2-xTB")


@dataclass(frozen=True)
class XTBSettings:
    """Calculator settings.

    Attributes:
        method: 'GFN1-xTB' or 'GFN2-xTB'.
        max_iterations: SCF iteration limit; a structure that needs more is 'unconverged'.
        electronic_temperature: Fermi smearing temperature in K (tblite's default is 300 K).
        accuracy: tblite's SCF accuracy factor (smaller is tighter; 1.0 is its default).
        threads: OpenMP threads per call; None means :func:`default_thread_count`.
    """

    method: str = "GFN1-xTB"
    max_iterations: int = 250
    electronic_temperature: float = 300.0
    accuracy: float = 1.0
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.max_iterations < 1:
            raise ValueError(f"max_iterations must be >= 1, got {self.max_iterations}")
        if not self.electronic_temperature > 0:
            raise ValueError(f"electronic_temperature must be > 0 K, got {self.electronic_temperature}")
        if not self.accuracy > 0:
            raise ValueError(f"accuracy must be > 0, got {self.accuracy}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1 or None, got {self.threads}")


@dataclass(frozen=True)
class SinglePoints:
    """Results for n structures of N atoms.

    Attributes:
        energy: (n,) float64 total energy in kcal/mol; NaN where the calculation failed.
        gradient: (n, N, 3) float64 dE/dR in kcal/mol/Å; zero rows where it failed.
        errors: n reasons: '' (success), 'unconverged' (SCF hit the iteration limit), 'nan'
            (non-finite result) or 'exception' (any other tblite error).
    """

    energy: np.ndarray
    gradient: np.ndarray
    errors: list[str]


def tblite_version() -> str:
    """The installed tblite version as 'major.minor.patch' (package metadata)."""
    from importlib.metadata import version

    return version("tblite")


def default_thread_count() -> int:
    """``OMP_NUM_THREADS`` when set to a positive integer, else 1."""
    try:
        return max(1, int(os.environ.get("OMP_NUM_THREADS", "1")))
    except ValueError:
        return 1


@lru_cache(maxsize=1)
def _openmp_runtime() -> Any:
    """ctypes handle through which the OpenMP runtime used by tblite is reachable, or None."""
    from tblite import _libtblite

    try:
        lib = ctypes.CDLL(_libtblite.__file__)
        lib.omp_get_max_threads.restype = ctypes.c_int
        lib.omp_set_num_threads.argtypes = [ctypes.c_int]
        return lib
    except (OSError, AttributeError):  # a build without OpenMP
        return None


@contextmanager
def openmp_threads(threads: int) -> Iterator[None]:
    """Run the block with ``threads`` OpenMP threads (for the calling thread), then restore."""
    lib = _openmp_runtime()
    if lib is None:
        yield
        return
    previous = int(lib.omp_get_max_threads())
    lib.omp_set_num_threads(int(threads))
    try:
        yield
    finally:
        lib.omp_set_num_threads(previous)


def _discard(message: str) -> None:
    """tblite logger that drops every message (output is silenced)."""


def _one_point(
    numbers: np.ndarray, positions_bohr: np.ndarray, settings: XTBSettings
) -> tuple[float, np.ndarray]:
    """One single point: (energy in Hartree, gradient (N, 3) in Hartree/Bohr); raises on failure."""
    from tblite.interface import Calculator

    calc = Calculator(settings.method, numbers, positions_bohr, color=False, logger=_discard)
    calc.set("verbosity", 0)
    calc.set("max-iter", settings.max_iterations)
    calc.set("accuracy", settings.accuracy)
    calc.set("temperature", settings.electronic_temperature * KELVIN_TO_HARTREE)
    result = calc.singlepoint()
    return float(result.get("energy")), np.asarray(result.get("gradient"), dtype=np.float64)


def single_points(numbers: np.ndarray, coords: np.ndarray, settings: XTBSettings) -> SinglePoints:
    """Energies and gradients of structures ``coords`` (n, N, 3) in Å with atomic ``numbers`` (N,).

    A failing structure is reported in ``errors`` and does not stop the others.
    """
    from tblite.exceptions import TBLiteRuntimeError

    coords = np.asarray(coords, dtype=np.float64)
    n, n_atoms = coords.shape[0], coords.shape[1]
    energy = np.full(n, np.nan)
    gradient = np.zeros((n, n_atoms, 3))
    errors = [""] * n
    numbers = np.asarray(numbers, dtype=np.int32)
    threads = settings.threads if settings.threads is not None else default_thread_count()
    with openmp_threads(threads):
        for k in range(n):
            try:
                e_ha, g_ha_bohr = _one_point(numbers, coords[k] / BOHR_TO_ANGSTROM, settings)
            except TBLiteRuntimeError as exc:
                errors[k] = "unconverged" if "not converged" in str(exc).lower() else "exception"
                continue
            except Exception:  # noqa: BLE001 - any tblite failure stays with its own sample
                errors[k] = "exception"
                continue
            if not (np.isfinite(e_ha) and np.isfinite(g_ha_bohr).all()):
                errors[k] = "nan"
                continue
            energy[k] = e_ha * HARTREE_TO_KCAL_MOL
            gradient[k] = g_ha_bohr * (HARTREE_TO_KCAL_MOL / BOHR_TO_ANGSTROM)
    return SinglePoints(energy=energy, gradient=gradient, errors=errors)
