"""Backbone (phi, psi) angles of peptide samples and their Ramachandran scatter plot.

Angles come from :func:`rewards.molecule.geometry.backbone_phi_psi` (SMARTS on the RDKit molecule)
and :func:`rewards.molecule.geometry.dihedral`, in degrees in (-180, 180]. For a peptide with several
residues, every residue contributes one point per sample. The figure is drawn with matplotlib's
object API on an Agg canvas, so no global backend is switched.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rewards.molecule.geometry import backbone_phi_psi, dihedral
from rewards.molecule.molecule import molecular_graph, molecule_with_hydrogens

__all__ = ["phi_psi_angles", "plot_ramachandran"]


def phi_psi_angles(x: np.ndarray, smiles: str) -> np.ndarray | None:
    """(phi, psi) of samples x (n, 3 N) in Å -> (n * R, 2) degrees for R residues; None if no backbone."""
    residues = backbone_phi_psi(molecule_with_hydrogens(smiles))
    if residues is None:
        return None
    coords = np.asarray(x, dtype=np.float64).reshape(-1, molecular_graph(smiles).n_atoms, 3)
    per_residue = [np.stack([dihedral(coords, phi), dihedral(coords, psi)], axis=-1) for phi, psi in residues]
    return np.concatenate(per_residue, axis=0)


def plot_ramachandran(
    path: Path, panels: list[tuple[str, np.ndarray]], title: str = "Ramachandran plot"
) -> Path:
    """Write a PNG with one (phi, psi) scatter per (label, angles (m, 2)) panel; returns ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.0 * len(panels), 4.8), constrained_layout=True)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    colours = ("tab:blue", "tab:red", "tab:green", "tab:purple")
    for k, (ax, (label, angles)) in enumerate(zip(axes, panels)):
        angles = np.asarray(angles, dtype=np.float64).reshape(-1, 2)
        if angles.shape[0]:
            colour = colours[k % len(colours)]
            ax.scatter(angles[:, 0], angles[:, 1], s=4, alpha=0.4, color=colour, linewidths=0)
        else:
            ax.text(0, 0, "no valid samples", ha="center", va="center")
        ax.set(xlim=(-180, 180), ylim=(-180, 180), xlabel="phi (deg)", ylabel="psi (deg)")
        ax.set_xticks(range(-180, 181, 90))
        ax.set_yticks(range(-180, 181, 90))
        ax.set_aspect("equal")
        ax.grid(alpha=0.3)
        ax.set_title(f"{label} (n={angles.shape[0]})")
    fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
