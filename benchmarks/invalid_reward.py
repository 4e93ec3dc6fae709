"""Failed samples in the lower tail: excluded or counted at a penalty (``objective.invalid_reward``).

The 2-D task with ``crash_radius``: its reward fails (NaN, reason 'crash') within 0.45 of (0.8, -0.8), inside
the body, where the neighbours' rewards are ordinary. Left-CVaR(0.1) fine-tuning with each solver under each
rule (``--centre failure`` puts the crashes in the low-reward well instead, where they hide in the left tail):

    python -m benchmarks.invalid_reward                 # -> benchmarks/results/invalid_reward.{md,json}
    python -m benchmarks.invalid_reward --size 4000 --steps 200 --out /tmp/inv   # a quicker look

For each run the table gives the fraction of failed samples in the base and the fine-tuned banks and the
fine-tuned left-CVaR(0.1) both ways: over the valid samples only, and with every failure at the penalty.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "tune_configs" / "toy2d_crash_left.yaml"


def _left_cvar(reward: np.ndarray, valid: np.ndarray, penalty: float | None) -> float:
    from tfft.tail import cvar

    r = reward[valid] if penalty is None else np.where(valid, reward, penalty)
    return float(cvar(r, side="left", alpha=0.1))


def _target_invalid(bank, summary: dict, value: float | None) -> float:
    """The crash mass of the run's target on its base bank: the weighted solver's tilt of the failures
    (`tfft.invalid.tilt_rewards`: at the penalty, or neutral under exclusion)."""
    from tfft.invalid import tilt_rewards
    from tfft.objective import Tilt

    tilt = Tilt.from_dict(summary["objective"])
    reward, rows = tilt_rewards(bank.reward, bank.valid, value, tilt.eta)
    w = tilt.weights(reward, rows)
    return float(w[~bank.valid].sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=10_000, help="bank and evaluation size (default 10000)")
    parser.add_argument("--steps", type=int, default=300, help="fine-tuning steps (default 300)")
    parser.add_argument("--penalty", type=float, default=-10.0, help="objective.invalid_reward of the penalty runs")
    parser.add_argument("--centre", choices=("body", "failure"), default="body",
                        help="crash region: in the body (the config's) or at the failure centre (radius 0.6)")
    parser.add_argument("--out", default="runs/invalid_reward", help="run directories (reruns resume)")
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "invalid_reward"))
    args = parser.parse_args()

    from pipelines.bankio import read_bank
    from pipelines.cli import main as tfft

    out = Path(args.out)
    rows, started = [], time.time()
    for solver in ("adjoint", "weighted"):
        for rule, value in (("exclude", None), ("penalty", args.penalty)):
            run_dir = out / f"{solver}_{rule}"
            crash = [] if args.centre == "body" else ["reward.kwargs.crash_centre=[-2.5,-1.5]",
                                                       "reward.kwargs.crash_radius=0.6"]
            overrides = [*crash, f"bank.size={args.size}", f"eval.size={args.size}", f"finetune.steps={args.steps}",
                         f"finetune.solver={solver}", f"objective.invalid_reward={'null' if value is None else value}"]
            code = tfft(["run", str(CONFIG), "--out", str(run_dir), *overrides])
            if code != 0:
                raise SystemExit(f"run {run_dir} failed with exit code {code}")
            summary = json.loads((run_dir / "summary.json").read_text())
            base, final = read_bank(run_dir / "bank_base.parquet"), read_bank(run_dir / "bank_final.parquet")
            rows.append({
                "solver": solver, "rule": rule, "invalid_reward": value,
                "eta": summary["threshold"]["eta"],
                "invalid_base": float((~base.valid).mean()), "invalid_finetuned": float((~final.valid).mean()),
                "lcvar_excluded_base": _left_cvar(base.reward, base.valid, None),
                "lcvar_penalty_base": _left_cvar(base.reward, base.valid, args.penalty),
                "lcvar_excluded": _left_cvar(final.reward, final.valid, None),
                "lcvar_penalty": _left_cvar(final.reward, final.valid, args.penalty),
                "mean_valid": float(np.mean(final.reward[final.valid])),
                "target_invalid": _target_invalid(base, summary, value),
            })
    seconds = time.time() - started
    lines = [
        "# Failures in the lower tail: excluded or counted at a penalty",
        "",
        f"Written by `python -m benchmarks.invalid_reward --size {args.size} --steps {args.steps} --penalty "
        f"{args.penalty:g} --centre {args.centre}` on {time.strftime('%Y-%m-%d')} ({os.cpu_count()} CPUs, "
        f"{platform.machine()}; {seconds / 60:.1f} min for the four runs). Config `tune_configs/toy2d_crash_left.yaml`: "
        "the 2-D task whose reward crashes "
        + ("within 0.45 of (0.8, -0.8), in the body" if args.centre == "body" else "within 0.6 of the failure centre")
        + ", left-CVaR(0.1), kl_weight 10. L-CVaR columns: the fine-tuned "
        f"model's left-CVaR(0.1) over valid samples only, and with every failure at {args.penalty:g}.",
        "",
        "| solver | failed samples | eta* | invalid % base | invalid % fine-tuned | L-CVaR excluded | "
        f"L-CVaR failures at {args.penalty:g} | mean of valid | target's crash mass (tilt on the base bank) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    base_row = rows[0]
    lines.append(f"| base model | | | {100 * base_row['invalid_base']:.2f} | | {base_row['lcvar_excluded_base']:.3f} | "
                 f"{base_row['lcvar_penalty_base']:.3f} | |")
    for row in rows:
        rule = "excluded" if row["invalid_reward"] is None else f"at {row['invalid_reward']:g}"
        lines.append(
            f"| {row['solver']} | {rule} | {row['eta']:.3f} | {100 * row['invalid_base']:.2f} | "
            f"{100 * row['invalid_finetuned']:.2f} | {row['lcvar_excluded']:.3f} | {row['lcvar_penalty']:.3f} | "
            f"{row['mean_valid']:.3f} | {row['target_invalid']:.2g} |"
        )
    results = Path(args.results + ("" if args.centre == "body" else "_failure_centre"))
    results.parent.mkdir(parents=True, exist_ok=True)
    results.with_suffix(".md").write_text("\n".join(lines) + "\n")
    results.with_suffix(".json").write_text(json.dumps({"size": args.size, "steps": args.steps,
                                                        "penalty": args.penalty, "seconds": seconds, "rows": rows}, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
