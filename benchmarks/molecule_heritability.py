"""When is a molecule's reward decided along the sampler? Resimulate the base model's SDE from time t.

    python -m benchmarks.molecule_heritability             # alanine dipeptide, 600 trajectories, about 2 minutes
    python -m benchmarks.molecule_heritability --quick     # 100 trajectories (smoke)
    python -m benchmarks.molecule_heritability --override reward.kwargs.relax_steps=200 \
        --results benchmarks/results/molecule_heritability_relaxed   # the reward of MMFF-relaxed structures

One process, no Ray. The base model of ``tune_configs/molecule_right.yaml`` (the pretraining cache, trained first
if absent) draws n trajectories of the law-preserving SDE; for each t in ``--times`` the same trajectories are
continued from X_t with fresh noise (the Brownian increments of the steps before t are kept, so the paths agree up
to t). GFN1-xTB scores every end point. For each t the table gives the rank correlation of the reward between
the original and the continued end points, and how many of the original right and left 10% tails are still in
the same tail after the continuation. A reward decided early (correlation near 1 from small t) is a property of
where the flow sends a sample, which a velocity change at early and middle times can tilt; a reward decided only
at the last steps is set by the final noise, which a tilt must undo at late times, where the path KL is costly.
Writes ``benchmarks/results/molecule_heritability.{md,json}``.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np
import torch

from benchmarks.molecule_lab import RESULTS, molecule_setup, score, write_results



def _ranks(x: np.ndarray) -> np.ndarray:
    return np.argsort(np.argsort(x)).astype(np.float64)


def _tail_kept(a: np.ndarray, b: np.ndarray, top: bool, alpha: float = 0.1) -> float:
    k = max(1, int(round(alpha * len(a))))
    order_a, order_b = np.argsort(a), np.argsort(b)
    sa = set((order_a[-k:] if top else order_a[:k]).tolist())
    sb = set((order_b[-k:] if top else order_b[:k]).tolist())
    return len(sa & sb) / k


def run(args: argparse.Namespace) -> dict[str, Any]:
    from pipelines.models import build_model
    from tfft.sampling import sample_sde

    torch.set_num_threads(args.threads)
    cfg, base, reward = molecule_setup(args.seed, args.override)
    model = build_model(base.config, base.state_dict).eval()
    steps, dim, n = cfg.sampler.steps, int(base.config["dim"]), args.n
    gen = torch.Generator().manual_seed(args.seed)
    noise = torch.randn(steps, n, dim, generator=gen)
    started = time.time()
    with torch.no_grad():
        x1 = sample_sde(model, torch.zeros(n, dim), steps, noise=noise)
    r0, v0 = score(reward, x1)
    rows = []
    for t in args.times:
        k = int(round(t * steps))
        fresh = noise.clone()
        fresh[k:] = torch.randn(steps - k, n, dim, generator=gen)
        with torch.no_grad():
            x1b = sample_sde(model, torch.zeros(n, dim), steps, noise=fresh)
        r1, v1 = score(reward, x1b)
        ok = v0 & v1 & np.isfinite(r0) & np.isfinite(r1)
        a, b = r0[ok], r1[ok]
        rho = float(np.corrcoef(_ranks(a), _ranks(b))[0, 1])
        rows.append({"t": k / steps, "step": k, "n_pairs": int(ok.sum()), "spearman": rho,
                     "right_tail_kept": _tail_kept(a, b, True), "left_tail_kept": _tail_kept(a, b, False)})
        print(f"[heritability] {rows[-1]}", flush=True)
    return {"smiles": cfg.task["smiles"], "seed": args.seed, "n": n, "sampler_steps": steps, "rows": rows,
            "seconds": time.time() - started, "overrides": list(args.override), "reward": repr(reward),
            "model": cfg.model.target or "tfft.model:VelocityMLP"}


def _table(result: dict[str, Any]) -> str:
    lines = [
        "# When is the reward decided? Base-model SDE trajectories continued from time t with fresh noise",
        "",
        f"Written by `python -m benchmarks.molecule_heritability"
        f"{''.join(' --override ' + o for o in result.get('overrides', []))}` in {result['seconds'] / 60:.1f} min. "
        f"Alanine dipeptide, GFN1-xTB reward (minus the energy above the reference; `{result.get('reward', '')}`), "
        f"{result['n']} trajectories of the "
        f"{result['sampler_steps']}-step law-preserving SDE of the base model (`{result.get('model', '')}`), "
        f"seed {result['seed']}. A tail kept "
        "by chance alone would be 0.10.",
        "",
        "| continued from t | rank correlation of the reward | right 10% tail kept | left 10% tail kept |",
        "|---|---|---|---|",
    ]
    for row in result["rows"]:
        lines.append(f"| {row['t']:.2f} | {row['spearman']:.2f} | {row['right_tail_kept']:.2f} | "
                     f"{row['left_tail_kept']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n", type=int, default=600, help="trajectories")
    parser.add_argument("--times", type=float, nargs="+", default=[0.5, 0.8, 0.9, 0.95, 0.98])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="100 trajectories")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override of tune_configs/molecule_right.yaml (repeatable)")
    parser.add_argument("--results", default=str(RESULTS / "molecule_heritability"), help="output stem")
    args = parser.parse_args()
    if args.quick:
        args.n = 100
    result = run(args)
    write_results(args.results, result, _table(result))


if __name__ == "__main__":
    main()
