"""The conformer reward: negative GFN-xTB energy relative to a reference, with analytic gradients.

A sample is a flattened structure x of shape (3 N,) in Å (atom order of
:func:`rewards.molecule.molecule.molecule_with_hydrogens`). Its reward, in kcal/mol, is

    r(x) = -(E(x) - E_ref),        dr/dx = -dE/dx   (kcal/mol/Å, tblite's analytic gradient),

with E the GFN1-xTB (or GFN2-xTB) energy and E_ref either a given number or "auto": the lowest
energy over a fixed set of ETKDG conformers (:mod:`rewards.molecule.reference`). The energy does not
change under rigid motions, so samples need no particular frame; the data are centred and aligned
only to help the MLP velocity network (see :mod:`rewards.molecule.geometry`).

Validity, checked in this order; an invalid sample gets reward NaN, ``valid=False`` and a reason,
and never stops the rest of the batch:

| reason | when |
|---|---|
| 'malformed' | the row is not 3 N finite numbers |
| 'topology' | the distance-implied bonds differ from the molecular graph (:mod:`rewards.molecule.topology`) |
| 'unconverged' | the SCF did not converge within ``max_iterations`` |
| 'exception' / 'nan' | tblite raised another error / returned a non-finite value |
| 'implausible' | E(x) lies more than ``max_below_reference`` kcal/mol below E_ref |

The last check is against an artefact of the self-consistent field: on a structure with atoms collapsed to a
fraction of a bond length (an ethanol C-H at 0.39 Å next to an H-H at 0.82 Å and an O-H at 0.63 Å, whose bonds
the topology check still counts as bonds) the SCF has several solutions and may settle in a spurious one about
2,300 kcal/mol below any conformer's energy; the same structure rounded differently does not converge, or gets
a strained structure's energy far above the reference (``python -m benchmarks.xtb_artefact``). One such sample
carries a right tail on its own: two fine-tuned butanol banks of about 1,900 samples held one each (r = +1,150
and +987), which lifted their R-CVaR(0.1) by about 6 kcal/mol (the butanol table before this check). No
conformer lies far below the reference (the best of ``reference_samples`` ETKDG structures): in the molecule
tables no valid sample of a base bank lies below it at all.
"""

from __future__ import annotations

import pathlib
from typing import Any

import numpy as np
import rdkit
import torch

from rewards.base import Reward, RewardBatch
from rewards.molecule.conformers import from_sample_space
from rewards.molecule.geometry import mean_pairwise_rmsd
from rewards.molecule.molecule import ALANINE_DIPEPTIDE, molecular_graph
from rewards.molecule.ramachandran import phi_psi_angles, plot_ramachandran
from rewards.molecule.reference import reference_energy
from rewards.molecule.relax import has_mmff_parameters, relax
from rewards.molecule.topology import BOND_TOLERANCE, bonded_topology_ok
from rewards.molecule.xtb_backend import XTBSettings, single_points, tblite_version

__all__ = ["XTBEnergy"]

_DIVERSITY_SAMPLES = 200  # describe(): structures used for the pairwise RMSD


class _AttachGradient(torch.autograd.Function):
    """Identity on precomputed rewards whose backward uses a precomputed gradient.

    forward(x (n, d), values (n,), grad (n, d)) -> values; backward: dL/dx = dL/dvalues[:, None] * grad.
    Rows of invalid samples carry a zero gradient whatever flows back into them.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, values: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(grad)
        return values.clone()

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        (grad,) = ctx.saved_tensors
        upstream = torch.nan_to_num(grad_output, nan=0.0, posinf=0.0, neginf=0.0)
        return (upstream[:, None] * grad).to(grad.dtype), None, None


class XTBEnergy(Reward):
    """r(x) = -(E_GFN(x) - E_ref) in kcal/mol for flattened structures x (n, 3 N) in Å.

    Args:
        smiles: the molecule (default alanine dipeptide); any SMILES RDKit and tblite handle.
        method: 'GFN1-xTB' or 'GFN2-xTB'.
        reference: 'auto' (lowest energy over ``reference_samples`` ETKDG conformers drawn with
            ``reference_seed``, computed on first use and cached under ``cache_dir``) or E_ref in kcal/mol.
        tolerance: bond threshold factor of the topology check.
        max_iterations: SCF iteration limit.
        electronic_temperature: electronic (Fermi) temperature in K.
        accuracy: tblite SCF accuracy factor.
        reference_samples, reference_seed: the conformer set of the 'auto' reference.
        cache_dir: directory of the reference-energy cache; None disables it.
        threads: OpenMP threads per calculation; None = OMP_NUM_THREADS if set, else 1.
        scale: None when samples are Å coordinates; else samples are displacements from the
            reference structure in units of ``scale`` Å (as ``sample_conformers(..., scale=)`` makes
            them), and gradients are with respect to those displacements.
        max_below_reference: kcal/mol; a structure whose energy lies further below E_ref is invalid
            ('implausible', module docstring); ``inf`` switches the check off.
        relax_steps: 0 scores the structure as generated; n > 0 first relaxes it by at most n MMFF94 steps
            (:func:`rewards.molecule.relax.relax`; MMFF94 must parameterise the molecule) and scores the relaxed
            structure, the energy of its conformation, without a gradient (the weighted solver fine-tunes it).
    """

    name = "xtb_energy"
    version = "2"  # 2: collapsed bonds are invalid (rewards.molecule.topology.BOND_MIN_RATIO)
    differentiable = True

    def __init__(
        self,
        smiles: str = ALANINE_DIPEPTIDE,
        method: str = "GFN1-xTB",
        reference: str | float = "auto",
        tolerance: float = BOND_TOLERANCE,
        max_iterations: int = 250,
        electronic_temperature: float = 300.0,
        accuracy: float = 1.0,
        reference_samples: int = 500,
        reference_seed: int = 0,
        cache_dir: str | None = "~/.cache/tfft/molecule",
        threads: int | None = None,
        scale: float | None = None,
        max_below_reference: float = 50.0,
        relax_steps: int = 0,
    ):
        self.graph = molecular_graph(smiles)  # raises ValueError naming an invalid SMILES
        self.smiles = smiles
        self.settings = XTBSettings(
            method=method,
            max_iterations=int(max_iterations),
            electronic_temperature=float(electronic_temperature),
            accuracy=float(accuracy),
            threads=threads,
        )
        if isinstance(reference, str):
            if reference != "auto":
                raise ValueError(f"reference must be 'auto' or a number in kcal/mol, got {reference!r}")
            self._reference: float | None = None
        else:
            self._reference = float(reference)
            if not np.isfinite(self._reference):
                raise ValueError(f"reference energy must be finite, got {reference}")
        self.reference = reference
        if not tolerance > 0:
            raise ValueError(f"tolerance must be > 0, got {tolerance}")
        if reference_samples < 1:
            raise ValueError(f"reference_samples must be >= 1, got {reference_samples}")
        self.tolerance = float(tolerance)
        self.reference_samples = int(reference_samples)
        self.reference_seed = int(reference_seed)
        self.cache_dir = cache_dir
        if scale is not None and not scale > 0:
            raise ValueError(f"scale must be > 0 Å or None, got {scale}")
        self.scale = None if scale is None else float(scale)
        if not float(max_below_reference) > 0:
            raise ValueError(f"max_below_reference must be > 0 kcal/mol (inf: no check), got {max_below_reference}")
        self.max_below_reference = float(max_below_reference)
        if isinstance(relax_steps, bool) or int(relax_steps) != relax_steps or relax_steps < 0:
            raise ValueError(f"'reward.kwargs.relax_steps' must be an integer >= 0, got {relax_steps!r}")
        self.relax_steps = int(relax_steps)
        if self.relax_steps and not has_mmff_parameters(smiles):
            raise ValueError(f"'reward.kwargs.relax_steps' needs MMFF94 parameters, which {smiles!r} lacks")
        self.differentiable = self.relax_steps == 0  # the relaxation's Jacobian is not computed

    # -- identity -------------------------------------------------------------------------------
    def value_kwargs(self) -> dict[str, Any]:
        """The settings that change reward values (for the reward cache), with library versions."""
        return {
            "smiles": self.smiles,
            "method": self.settings.method,
            "reference": self.reference,
            "tolerance": self.tolerance,
            "max_iterations": self.settings.max_iterations,
            "electronic_temperature": self.settings.electronic_temperature,
            "accuracy": self.settings.accuracy,
            "reference_samples": self.reference_samples,
            "reference_seed": self.reference_seed,
            "scale": self.scale,
            "max_below_reference": self.max_below_reference,
            **({"relax_steps": self.relax_steps} if self.relax_steps else {}),  # unrelaxed cache keys unchanged
            "tblite": tblite_version(),
            "rdkit": rdkit.__version__,
        }

    def reference_energy(self) -> float:
        """E_ref in kcal/mol (the 'auto' value is computed or read from disk on first call)."""
        if self._reference is None:
            self._reference = reference_energy(
                self.smiles, self.settings, self.reference_samples, self.reference_seed, self.cache_dir
            )
        return self._reference

    # -- evaluation -----------------------------------------------------------------------------
    def _compute(self, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """x (n, d) -> rewards (n,) float64 (NaN if invalid), dr/dx (n, d) float64, reasons."""
        if x.ndim != 2:
            raise ValueError(
                f"XTBEnergy expects a batch of shape (n, {self.graph.dim}), got {tuple(x.shape)}"
            )
        arr = x.detach().to("cpu", torch.float64).numpy()
        n, d = arr.shape
        if d == self.graph.dim:
            arr = from_sample_space(arr, self.smiles, self.scale)
        rewards = np.full(n, np.nan)
        grad = np.zeros((n, d))
        if d != self.graph.dim:
            return rewards, grad, ["malformed"] * n
        errors = ["" if ok else "malformed" for ok in np.isfinite(arr).all(axis=1)]
        topology = bonded_topology_ok(arr, self.smiles, self.tolerance)
        errors = [e or ("" if ok else "topology") for e, ok in zip(errors, topology)]
        rows = np.array([k for k, e in enumerate(errors) if not e], dtype=np.int64)
        if rows.size:
            coords = arr[rows].reshape(-1, self.graph.n_atoms, 3)
            if self.relax_steps:
                coords = relax(coords, self.smiles, self.relax_steps)
            points = single_points(self.graph.numbers, coords, self.settings)
            e_ref = self.reference_energy()
            for k, row in enumerate(rows):
                errors[row] = points.errors[k]
                if not points.errors[k] and points.energy[k] - e_ref < -self.max_below_reference:
                    errors[row] = "implausible"
                if not errors[row]:
                    rewards[row] = -(points.energy[k] - e_ref)
                    # dr/dz = scale * dr/dx in the displacement form (x = x_ref + scale z)
                    grad[row] = -points.gradient[k].reshape(-1) * (self.scale or 1.0)
        return rewards, grad, errors

    @staticmethod
    def _batch(x: torch.Tensor, rewards: np.ndarray, errors: list[str]) -> RewardBatch:
        valid = torch.as_tensor([not e for e in errors], dtype=torch.bool, device=x.device)
        values = torch.as_tensor(rewards, dtype=torch.float64, device=x.device)
        return RewardBatch(values, valid, None if bool(valid.all()) else errors)

    def evaluate(self, x: torch.Tensor) -> RewardBatch:
        """Rewards of x (n, 3 N); differentiable by autograd through the analytic gradient."""
        rewards, grad, errors = self._compute(x)
        batch = self._batch(x, rewards, errors)
        if torch.is_grad_enabled() and x.requires_grad and self.differentiable:  # relaxed: no gradient
            grad_t = torch.as_tensor(grad, dtype=x.dtype, device=x.device)
            attached = _AttachGradient.apply(x, batch.rewards, grad_t)
            batch = RewardBatch(attached, batch.valid, batch.errors)
        return batch

    def evaluate_with_grad(self, x: torch.Tensor) -> tuple[RewardBatch, torch.Tensor]:
        """Rewards and dr/dx = -dE/dx (n, 3 N) in kcal/mol/Å from tblite, zero rows where invalid."""
        if not self.differentiable:
            raise TypeError(f"reward {self.name!r} with relax_steps={self.relax_steps} has no gradients")
        rewards, grad, errors = self._compute(x)
        return self._batch(x, rewards, errors), torch.as_tensor(grad, dtype=x.dtype, device=x.device)

    # -- pipeline hooks -------------------------------------------------------------------------
    def describe(self, x: np.ndarray, valid: np.ndarray) -> dict[str, float]:
        """Per-bank statistics of samples x (n, 3 N).

        diversity_rmsd: mean pairwise aligned RMSD (Å) among valid samples (at most 200 of them,
            evenly spaced through the bank); NaN with fewer than two.
        topology_valid: fraction of all n samples passing the bonded-topology check.
        """
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.graph.dim or x.shape[0] == 0:
            return {"diversity_rmsd": float("nan"), "topology_valid": float("nan")}
        x = from_sample_space(x, self.smiles, self.scale)
        topology = bonded_topology_ok(x, self.smiles, self.tolerance)
        keep = np.asarray(valid, dtype=bool).reshape(-1) & np.isfinite(x).all(axis=1)
        chosen = x[keep]
        if chosen.shape[0] > _DIVERSITY_SAMPLES:
            chosen = chosen[np.linspace(0, chosen.shape[0] - 1, _DIVERSITY_SAMPLES).astype(np.int64)]
        coords = chosen.reshape(-1, self.graph.n_atoms, 3)
        pairs = _DIVERSITY_SAMPLES * (_DIVERSITY_SAMPLES - 1) // 2
        return {
            "diversity_rmsd": mean_pairwise_rmsd(coords, max_pairs=pairs),
            "topology_valid": float(topology.mean()),
        }

    def figures(
        self,
        out_dir: pathlib.Path,
        base_x: np.ndarray,
        base_valid: np.ndarray,
        final_x: np.ndarray,
        final_valid: np.ndarray,
    ) -> list[pathlib.Path]:
        """``ramachandran.png`` (valid base vs fine-tuned samples) for peptides; [] otherwise."""
        panels = []
        for label, x, valid in (("base", base_x, base_valid), ("fine-tuned", final_x, final_valid)):
            x = np.asarray(x, dtype=np.float64)
            if x.ndim != 2 or x.shape[1] != self.graph.dim:
                return []
            x = from_sample_space(x, self.smiles, self.scale)
            keep = np.asarray(valid, dtype=bool).reshape(-1) & np.isfinite(x).all(axis=1)
            angles = phi_psi_angles(x[keep], self.smiles)
            if angles is None:
                return []
            panels.append((label, angles))
        title = f"{self.smiles} ({self.settings.method})"
        return [plot_ramachandran(pathlib.Path(out_dir) / "ramachandran.png", panels, title=title)]

    def __repr__(self) -> str:
        return (
            f"XTBEnergy(smiles={self.smiles!r}, method={self.settings.method!r}, "
            f"reference={self.reference!r}, cache_dir={self.cache_dir!r}, relax_steps={self.relax_steps})"
        )
