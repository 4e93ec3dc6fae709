"""How much sharper would the evaluation check be with common random numbers? Base and fine-tuned samples drawn
with the same noise, on the molecule table's runs.

    python -m benchmarks.paired_check                         # runs of `benchmarks.molecule_table` (alanine)
    python -m benchmarks.paired_check --work runs/molecule_bench_butanol --name butanol --n 1000

The evaluation check (`pipelines.eval_guard`) compares the fine-tuned samples' own statistic S_f with the base
bank's S_b, two independent samples: the standard error of S_f - S_b is sqrt(se_f^2 + se_b^2). If the base and
the fine-tuned model drew their samples from the same start points and Brownian increments, each statistic is
still the mean of its influence function phi (`tfft.objective.Tilt.influence`), and the difference
mean(phi_f - phi_b) has the standard error std(phi_f - phi_b) / sqrt(n), small when the rewards of the two
samples of one noise are correlated.

For each right and left run of ``--work`` (``<config>_seed<k>``) this draws ``--n`` samples of the base model
(the cached pretrained one) and of the fine-tuned model (``model_rejected.pt`` where the check kept the base),
in this process, with one noise, on the run's SDE, scores them with the run's reward, and reports the
difference of the run's own statistic with both standard errors and the correlation of the rewards. Writes
``benchmarks/results/paired_check[_<name>].{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.molecule_table import RESULTS, ROOT, _shown


def _models(run: Path) -> tuple[Any, Any, Any]:
    """(config, base model, fine-tuned model) of a run directory; the base from the pretraining cache only."""
    import torch

    from pipelines.config import load_config
    from pipelines.models import build_model
    from pipelines.pretrain import load_or_pretrain, pretrain_key

    cfg = load_config(run / "config.yaml", [])
    cached = Path(cfg.pretrain.cache_dir).expanduser() / f"base-{pretrain_key(cfg)}.pt"
    if not cached.is_file():
        raise SystemExit(f"{run}: its base model is not in the pretraining cache ({cached}); rerun the run first")
    base = load_or_pretrain(cfg, log=lambda line: None)
    rejected = run / "checkpoint" / "model_rejected.pt"
    blob = torch.load(rejected if rejected.is_file() else run / "checkpoint" / "model.pt", map_location="cpu",
                      weights_only=True)
    return cfg, build_model(base.config, base.state_dict).eval(), build_model(blob["config"], blob["state_dict"]).eval()


def _rewards(cfg: Any, x: Any) -> tuple[np.ndarray, np.ndarray]:
    from rewards.base import load_reward

    batch = load_reward(cfg.reward.target, cfg.reward.kwargs)(x)
    return batch.rewards.double().numpy(), batch.valid.numpy().astype(bool)


def paired(run: Path, n: int, seed: int) -> dict[str, Any]:
    """One run's comparison (module doc)."""
    import torch

    from pipelines.eval_paired import paired_statistics
    from tfft.objective import Tilt
    from tfft.sampling import sample_sde

    cfg, base, tuned = _models(run)
    summary = json.loads((run / "summary.json").read_text())
    tilt = Tilt.from_dict({k: v for k, v in summary["objective"].items() if k != "kind"})
    dim, steps = int(summary["model"]["dim"]), int(cfg.sampler.steps)
    gen = torch.Generator().manual_seed(seed)
    x0, noise = torch.randn(n, dim, generator=gen), torch.randn(steps, n, dim, generator=gen)
    started = time.time()
    with torch.no_grad():
        xb, xf = (sample_sde(model, x0, steps, noise=noise) for model in (base, tuned))
    (rb, vb), (rf, vf) = _rewards(cfg, xb), _rewards(cfg, xf)
    both = vb & vf & np.isfinite(rb) & np.isfinite(rf)
    rb, rf = rb[both], rf[both]
    (stat_b, se_b), (stat_f, se_f), (diff, se_d) = paired_statistics(tilt, rb, rf)  # the pipeline's paired check
    return {"run": run.name, "n": int(both.sum()), "statistic": tilt.name, "base": stat_b, "finetuned": stat_f,
            "difference": diff, "se_unpaired": math.hypot(se_b, se_f), "se_paired": se_d,
            "reward_correlation": float(np.corrcoef(rb, rf)[0, 1]),
            "tail_correlation": float(np.corrcoef(tilt.influence(rb), tilt.influence(rf))[0, 1]),
            "check_kept_base": (run / "checkpoint" / "model_rejected.pt").is_file(), "seconds": time.time() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default=str(ROOT / "runs" / "molecule_bench"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--configs", nargs="+", default=["right", "left"])
    parser.add_argument("--n", type=int, default=1000, help="samples per model and run")
    parser.add_argument("--name", default="", help="results go to paired_check_NAME.{md,json}")
    args = parser.parse_args()
    work = Path(args.work)
    rows = []
    for config in args.configs:
        for seed in args.seeds:
            row = paired(work / f"{config}_seed{seed}", args.n, seed=1000 + seed)
            rows.append(row)
            print(json.dumps(row), flush=True)
    lines = [
        f"# Paired against unpaired evaluation check ({args.name or 'alanine dipeptide'})",
        "",
        f"Written by `python -m benchmarks.paired_check --work {_shown(work)} --n {args.n}"
        f"{f' --name {args.name}' if args.name else ''}`: per run, {args.n} samples of the base and of the "
        "fine-tuned model drawn with the same start points and Brownian increments (the fine-tuned model as the "
        "solver left it), the run's own statistic of each, their difference, its standard error as two "
        "independent samples and as paired samples, and the correlation of the two samples' rewards and of "
        "their influence functions.",
        "",
        "| run | statistic | base | fine-tuned | difference | se unpaired | se paired | unpaired / paired | "
        "reward correlation | check kept the base |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['run']} | {r['statistic']} | {r['base']:.3f} | {r['finetuned']:.3f} | {r['difference']:+.3f} | "
                     f"{r['se_unpaired']:.3f} | {r['se_paired']:.3f} | {r['se_unpaired'] / r['se_paired']:.1f} | "
                     f"{r['reward_correlation']:.2f} | {'yes' if r['check_kept_base'] else 'no'} |")
    out = RESULTS / (f"paired_check_{args.name}" if args.name else "paired_check")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"work": _shown(work), "n": args.n, "runs": rows}, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
