"""Fresh samples of every molecule-table run: the fine-tuned models on noise the evaluation check never read.

    python -m benchmarks.molecule_recheck                                   # runs of `benchmarks.molecule_table`
    python -m benchmarks.molecule_recheck --work runs/molecule_bench_butanol --name butanol

Why: the guard's evaluation check (`pipelines.eval_guard`) and the table of `benchmarks.molecule_table` read the
same evaluation bank. A model no better than its base then passes the check about half the time, and the runs
that pass report a gain that is partly the evaluation's noise (a selection effect). Here every finished run
``<work>/<config>_seed<k>`` gets a second evaluation bank, ``bank_recheck.parquet``: ``eval.size`` samples of
the fine-tuned model as the solver left it (``checkpoint/model_rejected.pt`` when the check kept the base, else
``checkpoint/model.pt``), drawn with noise of their own (the bank label ``recheck``) and scored with the run's
reward. A rerun reuses the banks.

Writes ``benchmarks/results/molecule[_<name>]_recheck.{md,json}``, per model (mean ± std over seeds):
- the fine-tuned models on the fresh samples (the solver's result, before the check's choice);
- the models the runs kept (the base's bank statistics where the check kept the base);
- per run, the check's statistic of the fine-tuned samples against the fresh one (the selection effect);
- the solver issue's claims on the fresh samples: each TFFT model above the base and the expected-reward model
  on its own tail, the share of the gap to its exact target closed (target from the run's summary).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from benchmarks.molecule_table import CONFIGS, RESULTS, ROOT, _gap_closed, _shown, _stat

MODELS = {"mean": "expected reward", "right": "right-TFFT", "left": "left-TFFT"}
OWN = {"mean": ("mean", None), "right": ("cvar_right", "0.1"), "left": ("cvar_left", "0.1")}


def _own(stats: dict[str, Any], config: str) -> float:
    """The config's own statistic from a `tfft.target.TailSummary` dict: mean, R-CVaR(0.1) or L-CVaR(0.1)."""
    key, level = OWN[config]
    return float(stats[key] if level is None else stats[key][level])


def fresh_statistics(run: Path, log: Any = print) -> dict[str, Any]:
    """The fresh evaluation bank of the fine-tuned model of run directory ``run`` (module doc): its statistics
    (`tfft.target.summarize` under ``objective.invalid_reward``), valid fraction and which checkpoint it sampled."""
    import torch

    from pipelines.bank import build_bank
    from pipelines.config import load_config
    from pipelines.raysession import connect
    from tfft.target import summarize

    cfg = load_config(run / "config.yaml", [])
    rejected = run / "checkpoint" / "model_rejected.pt"
    path = rejected if rejected.is_file() else run / "checkpoint" / "model.pt"
    blob = torch.load(path, map_location="cpu", weights_only=True)
    connect(cfg.ray, log=log)
    bank, _ = build_bank(cfg, (blob["config"], blob["state_dict"]), size=cfg.eval.size, label="recheck",
                         out_path=run / "bank_recheck.parquet", log=log)
    reward, valid = bank.scored(cfg.objective.invalid_reward)
    accounting = bank.accounting()
    return {"stats": summarize(reward, valid=valid).to_dict(), "checkpoint": path.name,
            "validity_pct": 100.0 * accounting["valid"] / accounting["requested"]}


def collect(work: Path, seeds: list[int], log: Any = print) -> dict[str, list[dict[str, Any]]]:
    """Per config, per seed: the run's summary blocks and its fresh statistics."""
    out: dict[str, list[dict[str, Any]]] = {}
    for config in CONFIGS:
        out[config] = []
        for seed in seeds:
            run = work / f"{config}_seed{seed}"
            summary = json.loads((run / "summary.json").read_text())
            fresh = fresh_statistics(run, log)
            check = (summary.get("guard") or {}).get("evaluation") or {}
            kept_base = fresh["checkpoint"] == "model_rejected.pt"  # the evaluation check set the model aside
            out[config].append({
                "seed": seed, "base": _own(summary["base"], config), "target": _own(summary["target"], config),
                "fresh": _own(fresh["stats"], config), "fresh_stats": fresh["stats"],
                "fresh_validity_pct": fresh["validity_pct"], "kept_base": kept_base,
                "kept": _own(summary["base"] if kept_base else fresh["stats"], config),
                "check": check.get("finetuned"), "reported": _own(summary["finetuned"], config),
            })
    return out


def _column(rows: list[dict[str, Any]], key: str) -> list[float]:
    return [float(r[key]) for r in rows]


def report(runs: dict[str, list[dict[str, Any]]]) -> list[str]:
    """The results file's lines (module doc)."""
    lines = [
        "| model | own statistic | base | as reported (the check's samples) | fresh samples of the fine-tuned model | "
        "kept model on fresh samples | exact target |",
        "|---|---|---|---|---|---|---|",
    ]
    names = {"mean": "mean reward", "right": "R-CVaR(0.1)", "left": "L-CVaR(0.1)"}
    for config in CONFIGS:
        rows = runs[config]
        lines.append(f"| {MODELS[config]} | {names[config]} | " + " | ".join(
            _stat(_column(rows, k)) for k in ("base", "reported", "fresh", "kept", "target")) + " |")
    lines += ["", "Per run (the check's statistic of the fine-tuned samples against the same model's fresh samples; "
              "'base kept': the evaluation check returned the base model):", ""]
    for config in CONFIGS:
        lines.append(f"- {MODELS[config]}: " + "; ".join(
            f"seed {r['seed']}: check {r['check']:.3f}, fresh {r['fresh']:.3f}"
            + (" (base kept)" if r["kept_base"] else "") for r in runs[config] if r["check"] is not None))
    selection = [r["check"] - r["fresh"] for c in CONFIGS for r in runs[c] if r["check"] is not None]
    if selection:
        lines += ["", f"Check minus fresh, over all {len(selection)} runs: mean {statistics.mean(selection):+.3f}, "
                  f"range {min(selection):+.3f} to {max(selection):+.3f} (zero on average without a selection "
                  "effect; each fine-tuned statistic is a mean over the evaluation's samples, its noise is the "
                  "check's standard error)."]
    lines += ["", "Claims on the fresh samples (means over seeds):"]
    expected = runs["mean"]
    for config in ("right", "left"):
        rows = runs[config]
        fresh, base, target = (statistics.mean(_column(rows, k)) for k in ("fresh", "base", "target"))
        key, level = OWN[config]
        exp = statistics.mean(float(r["fresh_stats"][key][level]) for r in expected)
        kept = statistics.mean(_column(rows, "kept"))
        lines.append(
            f"- {MODELS[config]}: {names[config]} {fresh:.2f} on fresh samples against the base's {base:.2f} "
            f"({'above' if fresh > base else 'NOT above'}) and the expected-reward model's {exp:.2f} "
            f"({'above' if fresh > exp else 'NOT above'}); gap to the target {target:.2f} closed "
            f"{100 * _gap_closed(fresh, base, target):.0f}% (the kept models: {100 * _gap_closed(kept, base, target):.0f}%; "
            f"claim: >= 70%).")
    validity = {c: statistics.mean(_column(runs[c], "fresh_validity_pct")) for c in CONFIGS}
    lines.append("- validity on fresh samples: " + ", ".join(f"{MODELS[c]} {v:.2f}%" for c, v in validity.items()))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default=str(ROOT / "runs" / "molecule_bench"),
                        help="the molecule table's run directories (its --work)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--name", default="", help="results go to molecule_NAME_recheck.{md,json}")
    args = parser.parse_args()
    work = Path(args.work)
    missing = [f"{c}_seed{s}" for c in CONFIGS for s in args.seeds if not (work / f"{c}_seed{s}" / "summary.json").is_file()]
    if missing:
        parser.error(f"--work {work}: no finished run {', '.join(missing)} (run benchmarks.molecule_table first)")
    runs = collect(work, args.seeds)
    out = RESULTS / (f"molecule_{args.name}_recheck" if args.name else "molecule_recheck")
    smiles = json.loads((work / "right_seed0" / "summary.json").read_text())["model"]["kwargs"].get("smiles", "?")
    header = [
        f"# {args.name or 'alanine dipeptide'} ({smiles}): the molecule table's runs on fresh samples",
        "",
        f"Seeds {args.seeds}; mean ± std over seeds. Written by `python -m benchmarks.molecule_recheck --work "
        f"{_shown(work)}{f' --name {args.name}' if args.name else ''}`: each run's fine-tuned model drew a second "
        "evaluation bank with its own noise (`bank_recheck.parquet`, the run's `eval.size`), which the evaluation "
        "check never read. 'base' is the base bank's statistic, 'as reported' the run's summary (the check's "
        "samples, or the base's where the check kept it).",
        "",
    ]
    lines = header + report(runs)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(
        {"seeds": args.seeds, "work": _shown(work), "runs": runs}, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
