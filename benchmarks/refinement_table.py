"""Threshold refinement on DESIGN §5's strong-tilt case, as a table from a finished run.

    tfft run tune_configs/gaussian_refine.yaml --out runs/gaussian_refine      # about 10 minutes on 2 cores
    python benchmarks/refinement_table.py runs/gaussian_refine               # -> benchmarks/results/refinement.md

The exact threshold comes from the closed-form tail mass of p_eta for r = x, x ~ N(0, 1) (see
tests/tfft/test_refine.py), so every round's threshold error is exact.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from scipy import optimize, stats


def exact_eta(alpha: float, kl_weight: float) -> float:
    c = 1.0 / (alpha * kl_weight)

    def mass(eta: float) -> float:
        log_a = c * c / 2 - c * eta + stats.norm.logsf(eta - c)
        return 1.0 / (1.0 + math.exp(stats.norm.logcdf(eta) - log_a))

    return optimize.brentq(lambda e: mass(e) - alpha, -20, 20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "refinement.md"))
    args = parser.parse_args()
    summary = json.loads((Path(args.run_dir) / "summary.json").read_text())
    from tfft.objective import Tilt

    tilt = Tilt.from_dict(summary["objective"])
    truth = exact_eta(tilt.alpha, tilt.kl_weight)
    lines = [
        f"Exact eta* = {truth:.3f} (alpha {tilt.alpha}, kl_weight {tilt.kl_weight}, right side).",
        f"Bank (ESS {summary['threshold']['ess']:.0f}): eta = {summary['threshold']['eta']:.3f}, "
        f"error {abs(summary['threshold']['eta'] - truth):.3f}.",
        "",
        "| round | eta | measured tail mass | bracket | next eta | error of next eta |",
        "|---|---|---|---|---|---|",
    ]
    for r in summary.get("refinement") or []:
        lo = "-inf" if r["lo"] is None else f"{r['lo']:.3f}"
        hi = "inf" if r["hi"] is None else f"{r['hi']:.3f}"
        lines.append(f"| {r['round']} | {r['eta']:.3f} | {r['tail_mass']:.4f} | ({lo}, {hi}) | "
                     f"{r['next_eta']:.3f} | {abs(r['next_eta'] - truth):.3f} |")
    text = "\n".join(lines) + "\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
