"""Molecules on GFN1-xTB: base vs expected-reward vs right-/left-TFFT over several seeds.

    python -m benchmarks.molecule_table                       # alanine dipeptide, 3 seeds x 3 configs
    python -m benchmarks.molecule_table --smiles CCCCO --name butanol   # another molecule: task.smiles only
    python -m benchmarks.molecule_table --seeds 0 --quick     # smaller banks and fewer steps (smoke)
    python -m benchmarks.molecule_table --throughput          # reward molecules/s, 1 vs 2 actors (2 min)

Runs ``tune_configs/molecule_{mean,right,left}.yaml`` for each seed (each run in
``<work>/<config>_seed<k>``; a finished run is reused, so an interrupted benchmark resumes), then writes
``benchmarks/results/molecule[_<name>].{md,json}``: per model, mean ± std over seeds of the mean energy, the
reward's right- and left-CVaR(0.1), validity and diversity, and the claims of the solver issue checked on the
seed means (each TFFT model beats the base and the expected-reward model on its own tail, closes at least 70%
of the gap between the base and its exact target, keeps validity within 2 points). ``--throughput`` instead measures the
reward throughput (molecules/s) of one and of two reward actors in one session.

Energies are in kcal/mol above the best of the reference ETKDG structures; reward = -energy.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ("mean", "right", "left")
RESULTS = ROOT / "benchmarks" / "results"


def _run(name: str, seed: int, work: Path, overrides: list[str]) -> dict[str, Any]:
    """One config and seed in ``work/<name>_seed<seed>`` (reused when finished)."""
    from pipelines.config import load_config
    from pipelines.run import run_pipeline

    out = work / f"{name}_seed{seed}"
    done = out / "summary.json"
    if done.is_file():
        return json.loads(done.read_text())
    cfg = load_config(ROOT / "tune_configs" / f"molecule_{name}.yaml", [f"seed={seed}", *overrides])
    return run_pipeline(cfg, out)


def _model_name(summary: dict[str, Any]) -> str:
    """The base model's factory and settings as ``summary.json["model"]`` records them."""
    model = summary.get("model", {})
    kwargs = {k: v for k, v in model.get("kwargs", {}).items() if k not in ("smiles", "scale")}
    return f"{model.get('target', '?')}({', '.join(f'{k}={v}' for k, v in kwargs.items())})"


def _timed_bank(work: Path, overrides: list[str], actors: int, n: int) -> float:
    from pipelines.bank import generate_bank
    from pipelines.config import load_config
    from pipelines.pretrain import load_or_pretrain

    cfg = load_config(
        ROOT / "tune_configs" / "molecule_right.yaml",
        [*overrides, "bank.cache=false", f"bank.reward.size={actors}", f"bank.shard_size={n}"],
    )
    base = load_or_pretrain(cfg)
    path = work / f"throughput_{actors}_{n}.parquet"
    shards = path.with_name(path.name + ".shards")
    for stale in [path, *(sorted(shards.iterdir()) if shards.is_dir() else [])]:
        stale.unlink(missing_ok=True)
    started = time.time()
    generate_bank(cfg, (base.config, base.state_dict), size=n, label=f"throughput{actors}_{n}", out_path=path)
    return time.time() - started


def throughput(work: Path, overrides: list[str], n: int) -> dict[str, float]:
    """Molecules/s of the reward pool with 1 and 2 actors: fresh samples, reward cache off, and the
    difference of a bank of n + n/5 samples against one of n/5, so actor start-up cancels out."""
    small = max(n // 5, 50)
    rates = {}
    for actors in (1, 2):
        extra = _timed_bank(work, overrides, actors, n + small) - _timed_bank(work, overrides, actors, small)
        rates[f"{actors}_actor"] = n / max(extra, 1e-9)
    return rates


def _shown(path: Path) -> str:
    """``path`` relative to the repository when inside it (results files carry no machine paths)."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return path.name


def _stat(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def table(summaries: dict[str, list[dict[str, Any]]]) -> tuple[list[str], dict[str, Any]]:
    """Markdown rows and the JSON record: one row per model, columns mean ± std over seeds."""
    rows: dict[str, list[dict[str, Any]]] = {"base": [], "expected reward": [], "right-TFFT": [], "left-TFFT": []}
    for name, label in (("mean", "expected reward"), ("right", "right-TFFT"), ("left", "left-TFFT")):
        for s in summaries[name]:
            rows[label].append({"stats": s["finetuned"], "samples": s.get("samples", {}).get("finetuned", {}),
                                "failures": s["failures"]["final"], "target": s["target"],
                                "interval": s.get("target_interval"),
                                "check": (s.get("guard") or {}).get("evaluation") or {}})
            if name == "mean":
                rows["base"].append({"stats": s["base"], "samples": s.get("samples", {}).get("base", {}),
                                     "failures": s["failures"]["base"]})

    def columns(entry: dict[str, Any]) -> dict[str, float]:
        st, fails = entry["stats"], entry["failures"]
        return {
            "mean_energy": -float(st["mean"]),
            "r_cvar_0.1": float(st["cvar_right"]["0.1"]),
            "l_cvar_0.1": float(st["cvar_left"]["0.1"]),
            "validity_pct": 100.0 * fails["valid"] / fails["requested"],
            "diversity_rmsd": float(entry["samples"].get("diversity_rmsd", float("nan"))),
            "target_r_cvar_0.1": float(entry["target"]["cvar_right"]["0.1"]) if "target" in entry else float("nan"),
            "target_l_cvar_0.1": float(entry["target"]["cvar_left"]["0.1"]) if "target" in entry else float("nan"),
            # the evaluation check's fine-tuned minus base (paired: its own samples of common noise)
            "check_difference": float(entry["check"]["finetuned"] - entry["check"]["base"])
            if entry.get("check") else float("nan"),
            "check_se": float(entry["check"].get("difference_se", float("nan"))) if entry.get("check") else float("nan"),
            "check_paired": bool(entry.get("check", {}).get("paired_n")),
            **{f"target_{key}_{end}": float(entry["interval"][end][f"cvar_{side}"]["0.1"]) if entry.get("interval")
               else float("nan") for key, side in (("r_cvar_0.1", "right"), ("l_cvar_0.1", "left")) for end in ("lo", "hi")},
        }

    record: dict[str, Any] = {}
    lines = [
        "| model | mean energy (kcal/mol) | R-CVaR(0.1) of reward | L-CVaR(0.1) of reward | validity % | diversity RMSD (Å) |",
        "|---|---|---|---|---|---|",
    ]
    for label, entries in rows.items():
        cols = [columns(e) for e in entries]
        record[label] = cols
        keys = ("mean_energy", "r_cvar_0.1", "l_cvar_0.1", "validity_pct", "diversity_rmsd")
        lines.append(f"| {label} | " + " | ".join(_stat([c[k] for c in cols]) for k in keys) + " |")
    return lines, record


def _check_text(check: dict[str, Any] | None) -> str:
    """`, check +0.19 +- 0.03 (paired)`: the evaluation check's difference and its error ('' without a check)."""
    if not check:
        return ""
    se = check.get("difference_se") or (check["base_se"] ** 2 + check["finetuned_se"] ** 2) ** 0.5
    return f", check {check['finetuned'] - check['base']:+.2f} ± {se:.2f}{' (paired)' if check.get('paired_n') else ''}"


def paired_versus(work: Path, seeds: list[int], config: str, other: str, side: str) -> tuple[float, float] | None:
    """``config``'s model minus ``other``'s on the tail ``side`` at alpha 0.1, paired: each run's evaluation-check
    samples of its fine-tuned model (``guard/check_finetuned.parquet``), drawn with one noise per row for every
    run of a seed (`pipelines.eval_paired`). (mean over seeds, its standard error); None without those banks."""
    from pipelines.bankio import read_bank
    from pipelines.eval_paired import check_paired
    from tfft.objective import Tilt

    paths = [(work / f"{other}_seed{s}" / "guard" / "check_finetuned.parquet",
              work / f"{config}_seed{s}" / "guard" / "check_finetuned.parquet") for s in seeds]
    if not all(a.is_file() and b.is_file() for a, b in paths):
        return None
    checks = [check_paired(read_bank(a), read_bank(b), Tilt(0.0, side, 0.1, 1.0)) for a, b in paths]
    diff = statistics.mean(c.finetuned - c.base for c in checks)
    return diff, sum(c.difference_se ** 2 for c in checks) ** 0.5 / len(checks)


def _gap_closed(own: float, base: float, target: float) -> float:
    """Fraction of the base-to-target gap closed: (own - base) / (target - base)."""
    return (own - base) / (target - base) if target != base else float("nan")


def claims(record: dict[str, Any]) -> list[str]:
    """The issue's claims, checked on the seed means: a line each, with the numbers."""
    def m(label: str, key: str) -> float:
        return statistics.mean(c[key] for c in record[label])

    out = []
    for side, key, model in (("right", "r_cvar_0.1", "right-TFFT"), ("left", "l_cvar_0.1", "left-TFFT")):
        own, base, exp = m(model, key), m("base", key), m("expected reward", key)
        target, lo, hi = m(model, f"target_{key}"), m(model, f"target_{key}_lo"), m(model, f"target_{key}_hi")
        closed, closed_lo, closed_hi = (_gap_closed(own, base, t) for t in (target, hi, lo))
        paired = [c for c in record[model] if c.get("check_paired")]
        if paired and len(paired) == len(record[model]):
            diff = statistics.mean(c["check_difference"] for c in paired)
            se = sum(c["check_se"] ** 2 for c in paired) ** 0.5 / len(paired)
            out.append(
                f"- {model}, paired (the evaluation check's own samples, base and fine-tuned of common noise): "
                f"fine-tuned minus base {diff:+.2f} ± {se:.2f} (mean over seeds, its standard error), "
                f"{100 * diff / (target - base):.0f}% ± {100 * se / abs(target - base):.0f}% of the gap to the target "
                f"(claim: >= 70%; the base side is the check's own base samples).")
        out.append(
            f"- {model} raises {side[0].upper()}-CVaR(0.1) above the base model: {'yes' if own > base else 'NO'} "
            f"({own:.2f} vs {base:.2f}); above the expected-reward model: {'yes' if own > exp else 'NO'} "
            f"({own:.2f} vs {exp:.2f}); exact target on the base bank {target:.2f} (bootstrap 90% interval "
            f"[{lo:.2f}, {hi:.2f}]); gap closed {100 * closed:.0f}% (against the interval's ends "
            f"{100 * closed_lo:.0f}% to {100 * closed_hi:.0f}%): {'yes' if closed >= 0.7 else 'NO'} (claim: >= 70%)."
        )
    for model in ("expected reward", "right-TFFT", "left-TFFT"):
        gap = m(model, "validity_pct") - m("base", "validity_pct")
        out.append(f"- validity of {model} within 2 points of the base model: {'yes' if abs(gap) <= 2 else 'NO'} ({gap:+.2f} points).")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--work", default=str(ROOT / "runs" / "molecule_bench"), help="run directories")
    parser.add_argument("--quick", action="store_true", help="banks of 500, 60 fine-tuning steps")
    parser.add_argument("--throughput", action="store_true",
                        help="only measure the reward throughput (1 vs 2 actors) -> OUT_throughput.{md,json}")
    parser.add_argument("--throughput-samples", type=int, default=1500)
    parser.add_argument("--smiles", default="", help="another molecule (task.smiles=...; nothing else changes)")
    parser.add_argument("--name", default="", help="its short name: results go to molecule_NAME.{md,json}")
    parser.add_argument("--out", default="", help="writes OUT.md and OUT.json (default: results/molecule[_NAME])")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every run, e.g. reward.kwargs.relax_steps=200 (repeatable; "
                             "with --name)")
    args = parser.parse_args()
    if (args.smiles or args.override) and not args.name:
        parser.error("--smiles and --override need --name (the results file's suffix)")
    args.out = args.out or str(RESULTS / (f"molecule_{args.name}" if args.name else "molecule"))
    if args.name and args.work == str(ROOT / "runs" / "molecule_bench"):
        args.work = str(ROOT / "runs" / f"molecule_bench_{args.name}")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    overrides = [f"tracking.uri=sqlite:///{work.resolve() / 'mlflow.db'}"]
    if args.smiles:
        overrides.append(f"task.smiles={args.smiles}")
    if args.quick:
        overrides += ["bank.size=500", "eval.size=500", "finetune.steps=60"]
    overrides += args.override
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.throughput:
        rates = throughput(work, overrides, args.throughput_samples)
        text = (
            f"Reward throughput, alanine dipeptide, GFN1-xTB single point plus topology check, "
            f"{args.throughput_samples} fresh samples through the Ray Data bank (cache off; the start-up of "
            f"the pools cancels in a difference of two banks), one run on one machine: 1 actor "
            f"{rates['1_actor']:.1f} molecules/s, 2 actors {rates['2_actor']:.1f} molecules/s, ratio "
            f"{rates['2_actor'] / rates['1_actor']:.2f}.\n"
        )
        Path(f"{out}_throughput.md").write_text(text)
        Path(f"{out}_throughput.json").write_text(json.dumps({"samples": args.throughput_samples, **rates}, indent=2))
        print(text)
        return
    summaries = {name: [_run(name, seed, work, overrides) for seed in args.seeds] for name in CONFIGS}
    lines, record = table(summaries)
    lines += ["", "Claims, on the means over seeds:", *claims(record)]
    for config, side in (("right", "right"), ("left", "left")):
        versus = paired_versus(work, args.seeds, config, "mean", side)
        if versus is not None:
            lines.append(f"- {config}-TFFT minus the expected-reward model on {side[0].upper()}-CVaR(0.1), paired (each "
                         f"run's check samples of its fine-tuned model, one noise per seed): {versus[0]:+.2f} ± "
                         f"{versus[1]:.2f} (mean over seeds, its standard error).")
    s0 = dict(summaries["right"][0], task_smiles=args.smiles or "CC(=O)N[C@@H](C)C(=O)NC")
    header = [
        f"# {(args.smiles and args.name) or 'Alanine dipeptide'} ({s0['task_smiles']}), GFN1-xTB energy"
        f"{' with ' + ', '.join(args.override) if args.override else ''}: base vs fine-tuned models",
        "",
        f"Seeds {args.seeds}; each cell mean ± std over seeds. kl_weight {s0['objective']['kl_weight']}, "
        f"alpha 0.1; reward = -(energy above the reference), so R-CVaR is the mean of the best 10% and "
        f"L-CVaR the mean of the worst 10% of rewards. Written by `python -m benchmarks.molecule_table"
        f"{' --quick' if args.quick else ''}{f' --smiles {args.smiles}' if args.smiles else ''}"
        f"{''.join(f' --override {o}' for o in args.override)}{f' --name {args.name}' if args.name else ''}`; "
        f"one run (bank, fine-tuning, evaluation) took "
        f"{statistics.median(s['wall_seconds'] for v in summaries.values() for s in v) / 60:.1f} min "
        f"(median) on this machine. Base model: `{_model_name(s0)}`.",
        "",
    ]
    footer = [
        "",
        "Reward throughput (1 vs 2 actors): `python -m benchmarks.molecule_table --throughput` -> "
        "`molecule_throughput.md`.",
        "",
        "Thresholds and the ESS of the bank's tilt weights (right / left; per seed): "
        + "; ".join(
            f"seed {seed}: eta {r['threshold']['eta']:.2f} / {lf['threshold']['eta']:.2f}, "
            f"ESS {r['threshold']['ess']:.0f} / {lf['threshold']['ess']:.0f}"
            for seed, r, lf in zip(args.seeds, summaries["right"], summaries["left"])
        ),
        "",
        "The guard's choice per run (kept state; early stop; the evaluation check's difference fine-tuned minus "
        "base on the run's own statistic, with its standard error, paired when `finetune.guard_paired_size` is set): "
        + "; ".join(
            f"{name} seed {seed}: {(s.get('guard') or {}).get('kept', '?')}"
            + (f" (stopped: {s['guard']['stopped_early']})" if (s.get("guard") or {}).get("stopped_early") else "")
            + _check_text((s.get("guard") or {}).get("evaluation"))
            for name in CONFIGS for seed, s in zip(args.seeds, summaries[name])
        ),
    ]
    out.with_suffix(".md").write_text("\n".join(header + lines + footer) + "\n")
    out.with_suffix(".json").write_text(json.dumps(
        {"seeds": args.seeds, "quick": args.quick, "models": record,
         "work": _shown(work), "runs": {name: [f"{name}_seed{s}" for s in args.seeds] for name in CONFIGS}},
        indent=2))
    print("\n".join(header + lines + footer))


if __name__ == "__main__":
    main()
