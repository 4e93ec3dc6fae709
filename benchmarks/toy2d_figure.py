"""Draw the README's picture of the 2-D task from three finished runs (mean, right, left).

    tfft run tune_configs/toy2d_mean.yaml  --out runs/toy2d_mean
    tfft run tune_configs/toy2d_right.yaml --out runs/toy2d_right
    tfft run tune_configs/toy2d_left.yaml  --out runs/toy2d_left
    python benchmarks/toy2d_figure.py runs/toy2d_mean runs/toy2d_right runs/toy2d_left \
        --out benchmarks/results/toy2d.png

Panels: the reward field with base samples, then each fine-tuned model's samples; below, the reward
histograms. A table of the statistics is written next to the figure (``.md``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from pipelines.bankio import read_bank  # noqa: E402
from rewards.toy2d import tail_reward  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mean_run")
    parser.add_argument("right_run")
    parser.add_argument("left_run")
    parser.add_argument("--out", default="benchmarks/results/toy2d.png")
    args = parser.parse_args()
    runs = {"expected reward": Path(args.mean_run), "right-CVaR(0.1)": Path(args.right_run), "left-CVaR(0.1)": Path(args.left_run)}
    base = read_bank(runs["expected reward"] / "bank_base.parquet")

    grid = np.linspace(-4.5, 4.5, 200)
    gx, gy = np.meshgrid(grid, grid)
    field = tail_reward(torch.as_tensor(np.stack([gx.ravel(), gy.ravel()], 1))).numpy().reshape(gx.shape)

    fig, axes = plt.subplots(2, 4, figsize=(17, 8), gridspec_kw={"height_ratios": [1.2, 1]})
    panels = [("base model", base)] + [(name, read_bank(p / "bank_final.parquet")) for name, p in runs.items()]
    bins = np.linspace(np.nanmin(base.reward), np.nanmax(base.reward), 70)
    rows = []
    for col, (name, bank) in enumerate(panels):
        ax = axes[0, col]
        ax.contourf(gx, gy, field, levels=30, cmap="RdYlGn", alpha=0.8)
        ax.scatter(bank.x[:3000, 0], bank.x[:3000, 1], s=1.5, c="k", alpha=0.5)
        ax.set_title(name)
        ax.set_aspect("equal")
        ax.set_xlim(-4.5, 4.5)
        ax.set_ylim(-4.5, 4.5)
        hist = axes[1, col]
        hist.hist(base.reward[base.valid], bins=bins, density=True, color="tab:gray", alpha=0.5, label="base")
        hist.hist(bank.reward[bank.valid], bins=bins, density=True, color="tab:blue", alpha=0.6, label=name)
        hist.set_yscale("log")
        hist.set_xlabel("reward")
        hist.legend(fontsize=8)
    for name, path in runs.items():
        s = json.loads((path / "summary.json").read_text())
        rows.append((name, s["finetuned"], s["target"]))
    base_stats = json.loads((runs["expected reward"] / "summary.json").read_text())["base"]
    fig.suptitle("2-D task: reward field (green high, red low) and samples; bottom: reward histograms")
    fig.tight_layout()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    lines = [
        "| model | mean | right-CVaR(0.1) | left-CVaR(0.1) | target mean | target R-CVaR(0.1) | target L-CVaR(0.1) |",
        "|---|---|---|---|---|---|---|",
        f"| base | {base_stats['mean']:.2f} | {base_stats['cvar_right']['0.1']:.2f} | {base_stats['cvar_left']['0.1']:.2f} | | | |",
    ]
    for name, ft, tg in rows:
        lines.append(
            f"| {name} | {ft['mean']:.2f} | {ft['cvar_right']['0.1']:.2f} | {ft['cvar_left']['0.1']:.2f} | "
            f"{tg['mean']:.2f} | {tg['cvar_right']['0.1']:.2f} | {tg['cvar_left']['0.1']:.2f} |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
