"""The GFN1-xTB artefact behind the reward's 'implausible' check (`rewards.molecule.xtb`).

    python -m benchmarks.xtb_artefact      # -> benchmarks/results/xtb_artefact.md (a few seconds)

A generated ethanol structure (a fine-tuned bank's sample; Å, atom order C C O H H H H H H) whose bonds pass the
topology check although C0-H4 is 0.39 Å long next to H4-H5 at 0.82 Å and O-H8 at 0.63 Å. Its energy, relative
to the reward's own reference, is computed at several roundings of the coordinates with the check switched
off (``max_below_reference=inf``) and with it on (the default). On this machine the SCF landed in a spurious
state about 2,300 kcal/mol below the reference at one rounding, did not converge at another and gave a
strained structure's energy (far above the reference) at a third: the SCF has several solutions there.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
from pathlib import Path

import numpy as np
import torch

from rewards.molecule.conformers import sample_conformers
from rewards.molecule.topology import distance_ratios
from rewards.molecule.molecule import molecular_graph
from rewards.molecule.xtb import XTBEnergy
from rewards.molecule.xtb_backend import tblite_version

COLLAPSED_ETHANOL = [
    [0.9031703436, -0.1558293426, -0.0528116448], [-0.5794455068, -0.2675959167, -0.1854505542],
    [-1.1693280759, 0.854663777, 0.4262846592], [1.3960014978, -0.864794087, -0.9035475948],
    [1.2336777119, -0.0537450411, 0.1259849829], [1.1421109287, 0.4650747386, 0.7572959763],
    [-0.9242731628, -1.1392344393, 0.3429650969], [-0.9334848734, -0.2236527489, -1.2424589293],
    [-0.9708296885, 1.3054251509, 0.82218012],
]
ROUNDINGS = (5, 6, 8, 10)  # decimals of Å


def _cell(batch) -> str:
    return f"{float(batch.rewards[0]):+.1f}" if bool(batch.valid[0]) else f"invalid ({batch.errors[0]})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "xtb_artefact.md"))
    args = parser.parse_args()
    x = np.asarray(COLLAPSED_ETHANOL)
    graph = molecular_graph("CCO")
    ratios = distance_ratios(x[None], graph.covalent_radii)[0][graph.adjacency]
    with tempfile.TemporaryDirectory() as cache:
        kwargs = {"smiles": "CCO", "reference_samples": 20, "cache_dir": cache}
        off, on = XTBEnergy(**kwargs, max_below_reference=float("inf")), XTBEnergy(**kwargs)
        conformers = off.evaluate(torch.as_tensor(sample_conformers(20, 0, smiles="CCO"), dtype=torch.float64))
        rows = []
        for decimals in ROUNDINGS:
            structure = torch.as_tensor(np.round(x, decimals).reshape(1, -1), dtype=torch.float64)
            rows.append(f"| 1e-{decimals} Å | {_cell(off.evaluate(structure))} | {_cell(on.evaluate(structure))} |")
    scores = conformers.rewards[conformers.valid]
    lines = [
        "# A spurious GFN1-xTB energy on a collapsed ethanol structure",
        "",
        f"Written by `python -m benchmarks.xtb_artefact` ({platform.machine()}, tblite {tblite_version()}). Reward "
        "r = -(E - E_ref) in kcal/mol, E_ref the best of 20 ETKDG conformers; the structure's bonded distances are "
        f"{ratios.min():.2f} to {ratios.max():.2f} of their covalent-radius sums (the topology check accepts any "
        f"bond below 1.3). For scale: 20 ETKDG conformers of ethanol (the data) score r from {float(scores.min()):+.1f} "
        f"to {float(scores.max()):+.1f}.",
        "",
        "| coordinates rounded to | r, check off | r, check on (default 50 kcal/mol) |",
        "|---|---|---|",
        *rows,
    ]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
