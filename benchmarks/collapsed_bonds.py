"""How often the molecule model generates a collapsed bond, and what GFN1-xTB makes of such a structure.

    python -m benchmarks.collapsed_bonds                                   # ethylene glycol, seeds 0 1 2
    python -m benchmarks.collapsed_bonds --smiles CCCCO --name butanol     # another molecule
    python -m benchmarks.collapsed_bonds --quick                           # 500 samples, seed 0 (smoke)

For each seed: the pretrained base model of ``tune_configs/molecule_left.yaml`` (with ``task.smiles``; built or
read from the pretraining cache as ``tfft run`` does), n samples from its SDE (the config's sampler steps), and
per sample the shortest bond as a fraction of its covalent radii sum (`rewards.molecule.topology`). Samples under
the validity bound (`BOND_MIN_RATIO`, 0.6) that pass the rest of the topology check are scored by GFN1-xTB: their
energy above the reference is what the check's lower bound keeps out of the tail statistics (such a structure
counted as valid before reward version 2). Results: ``benchmarks/results/collapsed_bonds[_<name>].md``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BOUNDS = (0.6, 0.7, 0.8)


def _samples(smiles: str, seed: int, n: int) -> tuple[np.ndarray, Any]:
    """(n, N, 3) Å coordinates from the base model of ``seed``, and the config."""
    from pipelines.config import load_config
    from pipelines.models import build_model
    from pipelines.pretrain import load_or_pretrain
    from rewards.molecule.conformers import from_sample_space
    from tfft.sampling import sample_sde

    cfg = load_config(ROOT / "tune_configs/molecule_left.yaml", [f"task.smiles={smiles}", f"seed={seed}"])
    base = load_or_pretrain(cfg, log=lambda _: None)
    model = build_model(base.config, base.state_dict).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        z = sample_sde(model, torch.randn(n, base.config["dim"], generator=gen), cfg.sampler.steps, generator=gen)
    coords = from_sample_space(z.double().numpy(), smiles, float(cfg.task["scale"]))
    return coords.reshape(n, -1, 3), cfg


def measure(smiles: str, seed: int, n: int) -> dict[str, Any]:
    """Counts of samples under each bound and the xTB energies of the collapsed ones that are otherwise valid."""
    from rewards.molecule.molecule import molecular_graph
    from rewards.molecule.topology import BOND_MIN_RATIO, bonded_topology_ok, distance_ratios
    from rewards.molecule.xtb import XTBEnergy
    from rewards.molecule.xtb_backend import single_points

    coords, cfg = _samples(smiles, seed, n)
    graph = molecular_graph(smiles)
    finite = np.isfinite(coords).all(axis=(1, 2))
    shortest = np.full(n, np.nan)
    shortest[finite] = np.where(graph.adjacency[None], distance_ratios(coords[finite], graph.covalent_radii),
                                np.inf).min(axis=(1, 2))
    collapsed = np.flatnonzero(shortest < BOND_MIN_RATIO)
    rest_ok = bonded_topology_ok(coords[collapsed], smiles, min_ratio=0.0) if collapsed.size else np.zeros(0, bool)
    energies: list[float] = []
    if rest_ok.any():
        reward = XTBEnergy(smiles=smiles, scale=float(cfg.task["scale"]), method="GFN1-xTB")
        points = single_points(graph.numbers, coords[collapsed[rest_ok]], reward.settings)
        energies = sorted(float(e - reward.reference_energy()) for e, err in zip(points.energy, points.errors)
                          if not err)
    return {"seed": seed, "n": n, "under": {b: int((shortest < b).sum()) for b in BOUNDS},
            "shortest": [round(float(s), 3) for s in np.sort(shortest[collapsed])], "energies": energies}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smiles", default="OCCO")
    parser.add_argument("--name", default="", help="results file suffix (default: none)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--n", type=int, default=5000, help="samples per seed (a molecule table's bank size)")
    parser.add_argument("--quick", action="store_true", help="500 samples of seed 0")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.n = [0], 500
    start = time.perf_counter()
    rows = [measure(args.smiles, seed, args.n) for seed in args.seeds]
    lines = [
        f"# Collapsed bonds in the molecule model's samples ({args.smiles})", "",
        f"Written by `python -m benchmarks.collapsed_bonds --smiles {args.smiles}"
        + (f" --name {args.name}" if args.name else "") + f"` in {(time.perf_counter() - start) / 60:.1f} min: "
        f"{args.n} SDE samples of each seed's pretrained base model (`tune_configs/molecule_left.yaml`). 'ratio' is a "
        "sample's shortest bond over its covalent radii sum (equilibrium: 0.79 for triple bonds to 1.09); the "
        "validity check's lower bound is 0.6. Energies: GFN1-xTB, kcal/mol above the reference, of the samples "
        "under 0.6 whose bonded topology is otherwise right (valid before reward version 2).", "",
        "| seed | samples | under 0.6 | under 0.7 | under 0.8 | their shortest ratios (under 0.6) | their energies |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        energies = ", ".join(f"{e:,.0f}" for e in r["energies"]) or "-"
        lines.append(f"| {r['seed']} | {r['n']} | {r['under'][0.6]} | {r['under'][0.7]} | {r['under'][0.8]} | "
                     f"{', '.join(map(str, r['shortest'])) or '-'} | {energies} |")
    path = RESULTS / f"collapsed_bonds{'_' + args.name if args.name else ''}.md"
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
