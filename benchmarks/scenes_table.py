"""The scenes task per prompt: base vs expected-reward vs right-/left-TFFT over several seeds.

    python -m benchmarks.scenes_table                    # seeds 0 1 2 x tune_configs/scenes_{mean,right,left}.yaml
    python -m benchmarks.scenes_table --seeds 0 --quick  # banks of 400, 20 fine-tuning steps (smoke)

Runs each config and seed through ``pipelines.run.run_pipeline`` (each run in ``<work>/<config>_seed<k>``; a
finished run is reused, so an interrupted benchmark resumes). Needs the pipeline's condition axis
(``data.conditions``). Per prompt it takes the rewards of the base bank (of the mean run) and of each run's final
bank, grouped by the prompt of each row (the bank's condition column); for a bank without one (``--resample``
forces this) it draws ``--n`` fresh samples per prompt from the base model and from the run's
``checkpoint/model.pt`` with the config's sampler and scores them with the config's reward. Writes
``benchmarks/results/scenes.{md,json}``: per prompt and model, mean ± std over seeds of the mean reward,
R-CVaR(0.1), L-CVaR(0.1) and the share of failures (r < -2).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from rewards.scenes import FAILURE_LEVEL
from tfft.tail import cvar

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ("mean", "right", "left")
MODELS = ("base", "expected reward", "right-TFFT", "left-TFFT")
CONDITION_COLUMNS = ("cond", "condition", "conditions", "prompt")


def _config(name: str, seed: int, overrides: list[str]):
    from pipelines.config import load_config

    return load_config(ROOT / "tune_configs" / f"scenes_{name}.yaml", [f"seed={seed}", *overrides])


def _run(name: str, seed: int, work: Path, overrides: list[str]) -> Path:
    """One config and seed in ``work/<name>_seed<seed>`` (reused when finished)."""
    from pipelines.run import run_pipeline

    out = work / f"{name}_seed{seed}"
    if not (out / "summary.json").is_file():
        run_pipeline(_config(name, seed, overrides), out)
    return out


def bank_rewards(path: Path, prompts: list[str]) -> dict[str, np.ndarray] | None:
    """The valid rewards of a bank file per prompt, from its condition column (the index of each row's prompt
    in ``prompts``, or the prompt itself); None without one."""
    table = pq.read_table(path)
    column = next((c for c in CONDITION_COLUMNS if c in table.column_names), None)
    if column is None:
        return None
    conds = table.column(column).to_pylist()
    names = np.asarray([prompts[c] if isinstance(c, int) else c for c in conds], dtype=object)
    reward = table.column("reward").to_numpy(zero_copy_only=False).astype(np.float64)
    valid = table.column("valid").to_numpy(zero_copy_only=False).astype(bool)
    return {p: reward[(names == p) & valid] for p in prompts}


def sampled_rewards(cfg: Any, state: dict[str, torch.Tensor], n: int, seed: int) -> dict[str, np.ndarray]:
    """Rewards of n fresh samples per prompt of ``cfg`` from the network with ``state`` (the config's sampler)."""
    from rewards.base import load_reward
    from tfft.sampling import sample_ode, sample_sde, time_grid
    from benchmarks.scenes_base import flat_velocity
    from tfft.conv_model import ConvVelocity

    prompts = list(cfg.data.conditions)
    net = ConvVelocity(**dict(cfg.model.kwargs), conditions=prompts)
    net.load_state_dict(state)
    net.eval()
    reward = load_reward(cfg.reward.target, dict(cfg.reward.kwargs))
    gen = torch.Generator().manual_seed(10_000 + seed)
    out = {}
    for p in prompts:
        x0 = torch.randn(n, 768, generator=gen)
        v = flat_velocity(net, [p] * n)
        with torch.no_grad():
            x = (sample_sde(v, x0, cfg.sampler.steps, generator=gen) if cfg.sampler.kind == "sde"
                 else sample_ode(v, x0, time_grid(cfg.sampler.steps, kind=cfg.sampler.grid)))
        batch = reward.evaluate(x.double(), [p] * n)
        out[p] = batch.rewards[batch.valid].numpy()
    return out


def per_prompt(run: Path, cfg: Any, which: str, n: int, seed: int, resample: bool) -> dict[str, np.ndarray]:
    """Rewards per prompt of a run's base (``which='base'``) or fine-tuned model."""
    found = None if resample else bank_rewards(run / f"bank_{which}.parquet", list(cfg.data.conditions))
    if found is not None:
        return found
    from pipelines.models import read_checkpoint
    from pipelines.pretrain import load_or_pretrain

    state = load_or_pretrain(cfg).state_dict if which == "base" else read_checkpoint(run / "checkpoint" / "model.pt")
    return sampled_rewards(cfg, state, n, seed)


def columns(r: np.ndarray) -> dict[str, float]:
    return {"mean": float(r.mean()), "r_cvar_0.1": cvar(r, side="right", alpha=0.1),
            "l_cvar_0.1": cvar(r, side="left", alpha=0.1), "failure_pct": 100.0 * float((r < FAILURE_LEVEL).mean())}


def _stat(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def table(record: dict[str, dict[str, list[dict[str, float]]]]) -> list[str]:
    """Markdown rows: one per prompt and model, mean ± std over seeds."""
    keys = ("mean", "r_cvar_0.1", "l_cvar_0.1", "failure_pct")
    lines = ["| prompt | model | mean reward | R-CVaR(0.1) | L-CVaR(0.1) | failures % (r < -2) |",
             "|---|---|---|---|---|---|"]
    for prompt, models in record.items():
        for model in MODELS:
            lines.append(f"| {prompt} | {model} | " + " | ".join(_stat([c[k] for c in models[model]]) for k in keys) + " |")
    return lines


def targets(runs: dict[str, list[Path]]) -> dict[str, dict[str, list[float]]]:
    """The exact targets per prompt from the runs' ``summary.json["per_condition"]``: R-CVaR(0.1) of the right
    runs' and L-CVaR(0.1) of the left runs' tilted base banks, one value per seed."""
    found: dict[str, dict[str, list[float]]] = {}
    for name, key in (("right", "cvar_right"), ("left", "cvar_left")):
        for run in runs.get(name, []):
            per = json.loads((run / "summary.json").read_text()).get("per_condition", {})
            for prompt, block in per.items():
                found.setdefault(prompt, {}).setdefault(name, []).append(float(block["target"][key]["0.1"]))
    return found


def claims(record: dict[str, dict[str, list[dict[str, float]]]], goal: dict[str, dict[str, list[float]]]) -> list[str]:
    """Per prompt, on the means over seeds: right-TFFT above base and expected reward on R-CVaR(0.1), left-TFFT
    above both on L-CVaR(0.1), and the share of the base-to-target gap each closed."""
    def mean(prompt: str, model: str, key: str) -> float:
        return statistics.mean(c[key] for c in record[prompt][model])

    lines = []
    for prompt in record:
        for side, model, key in (("right", "right-TFFT", "r_cvar_0.1"), ("left", "left-TFFT", "l_cvar_0.1")):
            got, base, mean_model = mean(prompt, model, key), mean(prompt, "base", key), mean(prompt, "expected reward", key)
            beats = got > base and got > mean_model
            target = goal.get(prompt, {}).get(side)
            closed = ""
            if target:
                want = statistics.mean(target)
                closed = f"; exact target {want:.2f}, gap closed {100 * (got - base) / (want - base):.0f}%"
            lines.append(f"- {prompt}, {model} {key[:1].upper()}-CVaR(0.1) {got:.2f} against base {base:.2f} and "
                         f"expected reward {mean_model:.2f}: {'beats both' if beats else 'does NOT beat both'}{closed}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--work", default=str(ROOT / "runs" / "scenes_bench"), help="run directories")
    parser.add_argument("--quick", action="store_true", help="banks of 400, 20 fine-tuning steps")
    parser.add_argument("--resample", action="store_true", help="score fresh samples instead of the banks")
    parser.add_argument("--n", type=int, default=500, help="fresh samples per prompt (--resample or no column)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scenes"))
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    # fine-tuning in the driver process (the configs' one worker without Ray Train's start-up; same loop)
    overrides = [f"tracking.uri=sqlite:///{work.resolve() / 'mlflow.db'}", "finetune.backend=local"]
    if args.quick:
        overrides += ["bank.size=400", "eval.size=400", "finetune.steps=20"]
    record: dict[str, dict[str, list[dict[str, float]]]] = {}
    walls = []
    runs: dict[str, list[Path]] = {}
    for seed in args.seeds:
        for name, model in zip(CONFIGS, MODELS[1:]):
            run = _run(name, seed, work, overrides)
            runs.setdefault(name, []).append(run)
            walls.append(json.loads((run / "summary.json").read_text()).get("wall_seconds", float("nan")))
            cfg = _config(name, seed, overrides)
            parts = [("final", model)] + ([("base", "base")] if name == "mean" else [])
            for which, label in parts:
                for prompt, r in per_prompt(run, cfg, which, args.n, seed, args.resample).items():
                    record.setdefault(prompt, {m: [] for m in MODELS})[label].append(columns(r))
    goal = targets(runs)
    cfg0 = _config("right", args.seeds[0], overrides)
    lines = [
        "# Scenes task (16x16 text-to-image): base vs fine-tuned models per prompt",
        "",
        f"Seeds {args.seeds}; each cell mean ± std over seeds. alpha 0.1, kl_weight {cfg0.objective.kl_weight}; "
        f"reward of `rewards.scenes.SceneReward` (README: Text-to-image task), so R-CVaR is the mean of the best "
        f"10% and L-CVaR of the worst 10% of one prompt's rewards. Written by `python -m benchmarks.scenes_table"
        f"{' --quick' if args.quick else ''}{' --resample' if args.resample else ''}`; one run (pretraining when "
        f"not cached, bank, fine-tuning in the driver process, evaluation) took {statistics.median(walls) / 60:.1f} min (median) on this "
        "machine.",
        "",
        *table(record),
        "",
        "Claims, per prompt on the means over seeds (the exact target: the tilted base bank's statistic):",
        *claims(record, goal),
    ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"seeds": args.seeds, "quick": args.quick, "prompts": record,
                                                    "targets": goal}, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
