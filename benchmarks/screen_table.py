"""Screened evaluation on the molecule task: the base bank with and without the MMFF94 screen.

    python -m benchmarks.screen_table                 # alanine dipeptide, seed 0, the configs' bank of 5,000
    python -m benchmarks.screen_table --finetune      # also fine-tune on both banks and compare (about 8 min)
    python -m benchmarks.screen_table --seed 1 --bank-size 8000
    python -m benchmarks.screen_table --quick         # ethanol, a bank of 600, a short pretraining (smoke only)

Builds the base bank of ``tune_configs/molecule_right.yaml`` (every sample through GFN1-xTB) and of
``tune_configs/molecule_right_screened.yaml`` (the same samples: same seed, model and bank label; GFN1-xTB only
where the screen and its audit say so), each in ``<work>/<config>_seed<k>`` with its own reward cache (a finished
bank is reused, so an interrupted benchmark resumes). Writes ``benchmarks/results/screen.{md,json}``: expensive
calls with and without screening and their ratio, the wall time of each bank, eta* both ways with the bootstrap
spread of eta* on the fully evaluated bank, and the target's R-CVaR(0.1) both ways with the fully evaluated bank's
bootstrap interval (`tfft.target.target_interval`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CONFIGS = {"full": "molecule_right", "screened": "molecule_right_screened"}
# smoke size: ethanol (9 atoms) and a small network, so that a short pretraining still gives valid structures
QUICK = ["task.smiles=CCO", "model.hidden=64", "pretrain.n_samples=1000", "pretrain.steps=1500", "bank.size=600",
         "bank.shard_size=300", "sampler.steps=20", "reward.kwargs.reference_samples=5"]


def _bank(name: str, seed: int, work: Path, overrides: list[str]) -> dict[str, Any]:
    """The base bank of one config in ``work/<config>_seed<seed>``: eta*, target R-CVaR(0.1), calls, wall time."""
    from pipelines.config import load_config
    from pipelines.run import run_bank_only
    from tfft.tail import solve_threshold
    from tfft.interval import target_interval

    out = work / f"{CONFIGS[name]}_seed{seed}"
    cfg = load_config(ROOT / "tune_configs" / f"{CONFIGS[name]}.yaml",
                      [f"seed={seed}", f"bank.cache_dir={(out / 'rewards').resolve()}", *overrides])
    timing = out / "bank_seconds.json"  # the time of the run that built the bank (a reused bank takes none)
    started = time.time()
    bank = run_bank_only(cfg, out)
    if not timing.is_file():
        timing.write_text(json.dumps({"seconds": time.time() - started}))
    seconds = float(json.loads(timing.read_text())["seconds"])
    obj = cfg.objective
    tilt = {"side": obj.side, "alpha": obj.alpha, "kl_weight": obj.kl_weight}
    reward, valid = bank.scored(obj.invalid_reward)
    eta = solve_threshold(reward, valid=valid, **tilt).eta
    interval = target_interval(reward, valid=valid, eta=eta, seed=seed, **tilt)
    rng = np.random.default_rng(seed)
    rows = np.flatnonzero(valid)
    spread = float(np.std([solve_threshold(reward[rng.choice(rows, rows.size)], **tilt).eta for _ in range(50)]))
    record = bank.screening or {"expensive_calls": len(bank), "skipped": 0, "audited": 0, "full": True}
    return {
        "n": len(bank), "expensive_calls": int(record["expensive_calls"]), "audited": int(record["audited"]),
        "full_fallback": bool(record["full"]), "miss_rate_upper": record.get("miss_rate_upper"),
        "eta": float(eta), "eta_bootstrap_sd": spread,
        "target_r_cvar_0.1": interval.estimate.cvar_right["0.1"],
        "target_r_cvar_0.1_lo": interval.lo.cvar_right["0.1"], "target_r_cvar_0.1_hi": interval.hi.cvar_right["0.1"],
        "bank_seconds": seconds, "run": out.name, "smiles": str(cfg.task.get("smiles", "")),
    }


def _finetuned(name: str, seed: int, work: Path, overrides: list[str]) -> dict[str, Any]:
    """The whole run of one config on top of its base bank (same directory, so the bank is reused): the
    fine-tuned model's R-CVaR(0.1) and the evaluation bank's expensive calls."""
    from pipelines.config import load_config
    from pipelines.run import run_pipeline

    out = work / f"{CONFIGS[name]}_seed{seed}"
    cfg = load_config(ROOT / "tune_configs" / f"{CONFIGS[name]}.yaml",
                      [f"seed={seed}", f"bank.cache_dir={(out / 'rewards').resolve()}", *overrides])
    summary = run_pipeline(cfg, out)
    final = (summary.get("screen") or {}).get("finetuned") or {"expensive_calls": cfg.eval.size}
    return {"finetuned_r_cvar_0.1": summary["finetuned"]["cvar_right"]["0.1"],
            "base_r_cvar_0.1": summary["base"]["cvar_right"]["0.1"],
            "eval_expensive_calls": int(final["expensive_calls"]), "eval_n": cfg.eval.size}


def _shown(path: Path) -> str:
    """``path`` relative to the repository when inside it (results files carry no machine paths)."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return path.name


def table(full: dict[str, Any], screened: dict[str, Any], command: str) -> list[str]:
    """The Markdown report of one seed."""
    ratio = full["expensive_calls"] / max(screened["expensive_calls"], 1)
    return [
        f"# Screened evaluation: {full['smiles']}, GFN1-xTB reward, MMFF94 screen (base bank)",
        "",
        f"Written by `{command}`. Same samples both ways (same seed, base model and bank label); the screened bank "
        f"calls GFN1-xTB on a random audit of {screened['audited']} and on what the screen ranks into the tail.",
        "",
        "| bank | expensive calls | wall time (s) | eta* | target R-CVaR(0.1) |",
        "|---|---|---|---|---|",
        f"| full evaluation | {full['expensive_calls']}/{full['n']} | {full['bank_seconds']:.0f} | "
        f"{full['eta']:.3f} (bootstrap sd {full['eta_bootstrap_sd']:.3f}) | {full['target_r_cvar_0.1']:.3f} "
        f"[{full['target_r_cvar_0.1_lo']:.3f}, {full['target_r_cvar_0.1_hi']:.3f}] |",
        f"| screened | {screened['expensive_calls']}/{screened['n']} | {screened['bank_seconds']:.0f} | "
        f"{screened['eta']:.3f} | {screened['target_r_cvar_0.1']:.3f} |",
        "",
        f"Expensive calls saved: {ratio:.2f}x"
        + (" (the audit could not certify the tail: full evaluation)." if screened["full_fallback"] else
           f"; certified miss rate <= {screened['miss_rate_upper']:.4f}.")
        + " The interval of the target is the fully evaluated bank's 90% bootstrap interval; eta* and the target "
        "agree when the screened values lie within it (eta*: within about two bootstrap sd).",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bank-size", type=int, default=0, help="bank.size of both banks (0: the configs')")
    parser.add_argument("--work", default=str(ROOT / "runs" / "screen_bench"), help="run directories")
    parser.add_argument("--quick", action="store_true", help="ethanol, banks of 600, a short pretraining (smoke)")
    parser.add_argument("--finetune", action="store_true", help="also fine-tune and evaluate on both banks")
    parser.add_argument("--out", default="", help="writes OUT.md and OUT.json (default: results/screen[_quick])")
    args = parser.parse_args()
    work = Path(args.work) / ("quick" if args.quick else "")
    work.mkdir(parents=True, exist_ok=True)
    overrides = [f"tracking.uri=sqlite:///{work.resolve() / 'mlflow.db'}"]
    overrides += QUICK if args.quick else []
    overrides += [f"bank.size={args.bank_size}"] if args.bank_size else []
    rows = {name: _bank(name, args.seed, work, overrides) for name in CONFIGS}
    command = "python -m benchmarks.screen_table" + (f" --seed {args.seed}" if args.seed else "") + (
        f" --bank-size {args.bank_size}" if args.bank_size else "") + (" --quick" if args.quick else "") + (
        " --finetune" if args.finetune else "")
    lines = table(rows["full"], rows["screened"], command)
    if args.finetune:
        runs = {name: _finetuned(name, args.seed, work, overrides) for name in CONFIGS}
        for name in CONFIGS:
            rows[name].update(runs[name])
        lines += ["", "Fine-tuned on each bank (the configs' solver), then evaluated (the screened run screens its "
                  "evaluation bank too):", "",
                  "| run | fine-tuned R-CVaR(0.1) | evaluation bank's expensive calls |", "|---|---|---|"]
        lines += [f"| {label} | {runs[name]['finetuned_r_cvar_0.1']:.3f} | "
                  f"{runs[name]['eval_expensive_calls']}/{runs[name]['eval_n']} |"
                  for name, label in (("full", "full evaluation"), ("screened", "screened"))]
    out = Path(args.out or RESULTS / ("screen_quick" if args.quick else "screen"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(
        {"seed": args.seed, "quick": args.quick, "work": _shown(work), "banks": rows,
         "ratio": rows["full"]["expensive_calls"] / max(rows["screened"]["expensive_calls"], 1)}, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
