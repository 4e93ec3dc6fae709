"""``tfft report DIR``: a sweep's trials side by side: a table (CSV and Markdown) and three figures.

The rows (`pipelines.report_rows`): every CVaR taken at the trial's own ``alpha``, on both sides, for the base
model, the fine-tuned model and the exact target, and ``kl_target``, KL(p* ‖ q) of the exact target; the
fine-tuned model's own KL is not estimated. Files go to ``DIR/report/``; with MLflow on, they are also
logged to the sweep's parent run.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pipelines.report_rows import COLUMNS, INTERVAL_NOTE, KL_NOTE, bank_rewards, trial_rows
from rewards.plots import pyplot

__all__ = ["write_report", "report_sweep"]


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    extra = [k for r in rows for k in r if k not in COLUMNS]
    return COLUMNS[:7] + list(dict.fromkeys(extra)) + COLUMNS[7:]


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def _write_tables(rows: list[dict[str, Any]], out: Path) -> str:
    columns = _columns(rows)
    with open(out / "report.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        "| " + " | ".join(columns) + " |",
        "|" + "---|" * len(columns),
        *("| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows),
    ]
    text = (
        "# Sweep report\n\nCVaRs at each trial's own alpha on both sides: base model, fine-tuned model, exact "
        f"target (DESIGN §5).\n{KL_NOTE}.\n{INTERVAL_NOTE}.\n\n" + "\n".join(lines) + "\n"
    )
    (out / "report.md").write_text(text)
    return "\n".join(lines)


def _mean_by(rows: list[dict[str, Any]], key: Callable[[dict[str, Any]], Any], value: str) -> dict[Any, float]:
    groups: dict[Any, list[float]] = {}
    for r in rows:
        groups.setdefault(key(r), []).append(r[value])
    return {k: float(np.mean(v)) for k, v in sorted(groups.items())}


def _plot_cvar_vs_alpha(rows: list[dict[str, Any]], path: Path) -> None:
    """Rows: objective side; columns: right- and left-CVaR at alpha; a line per kl_weight (mean over seeds)."""
    plt = pyplot()
    sides = sorted({r["side"] for r in rows}, reverse=True)
    fig, axes = plt.subplots(len(sides), 2, figsize=(10, 3.8 * len(sides)), squeeze=False)
    colors = plt.get_cmap("viridis")
    kls = sorted({r["kl_weight"] for r in rows})
    for i, side in enumerate(sides):
        mine = [r for r in rows if r["side"] == side]
        for j, stat in enumerate(("right", "left")):
            ax = axes[i][j]
            base = _mean_by(mine, lambda r: r["alpha"], f"base_cvar_{stat}")
            ax.plot(list(base), list(base.values()), "k:", marker=".", label="base model")
            for k, kl in enumerate(kls):
                color = colors(k / max(len(kls) - 1, 1) * 0.85)
                sel = [r for r in mine if r["kl_weight"] == kl]
                if not sel:
                    continue
                ft = _mean_by(sel, lambda r: r["alpha"], f"finetuned_cvar_{stat}")
                tg = _mean_by(sel, lambda r: r["alpha"], f"target_cvar_{stat}")
                ax.plot(list(ft), list(ft.values()), "-o", color=color, label=f"fine-tuned, kl_weight={kl:g}")
                ax.plot(list(tg), list(tg.values()), "--x", color=color, alpha=0.7, label=f"target, kl_weight={kl:g}")
            ax.set_xlabel("alpha (tail mass)")
            ax.set_ylabel(f"{stat}-CVaR(alpha)")
            ax.set_title(f"{side}-CVaR objective: {stat}-CVaR")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_tradeoff(rows: list[dict[str, Any]], path: Path) -> None:
    """The objective's CVaR (own side, own alpha) against KL(p*||q) of the target; a curve per alpha."""
    plt = pyplot()
    sides = sorted({r["side"] for r in rows}, reverse=True)
    fig, axes = plt.subplots(1, len(sides), figsize=(6.5 * len(sides), 4.6), squeeze=False)
    colors = plt.get_cmap("plasma")
    for ax, side in zip(axes[0], sides):
        mine = [r for r in rows if r["side"] == side]
        alphas = sorted({r["alpha"] for r in mine})
        for k, alpha in enumerate(alphas):
            color = colors(k / max(len(alphas) - 1, 1) * 0.85)
            sel = sorted((r for r in mine if r["alpha"] == alpha), key=lambda r: r["kl_target"])
            x = [r["kl_target"] for r in sel]
            ax.plot(x, [r[f"finetuned_cvar_{side}"] for r in sel], "-o", color=color, label=f"fine-tuned, alpha={alpha:g}")
            ax.plot(x, [r[f"target_cvar_{side}"] for r in sel], "--", marker="o", mfc="none", color=color, alpha=0.7,
                    label=f"target, alpha={alpha:g}")
            for r in sel:
                ax.annotate(f"kl_weight={r['kl_weight']:g}", (r["kl_target"], r[f"finetuned_cvar_{side}"]), fontsize=6,
                            xytext=(3, -8), textcoords="offset points")
            if sel:
                ax.axhline(sel[0][f"base_cvar_{side}"], color=color, linestyle=":", linewidth=0.8)
        ax.set_xlabel("KL(p*||q) of the target: sum_i w_i log(N w_i), tilt weights on the base bank")
        ax.set_ylabel(f"{side}-CVaR(alpha) (dotted: base model)")
        ax.set_title(f"{side}-CVaR objective: tail statistic vs KL from the base model")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_histograms(sweep_dir: Path, rows: list[dict[str, Any]], path: Path) -> None:
    """A grid of reward histograms: a row per (side, alpha, other keys), a column per kl_weight; base vs fine-tuned."""
    plt = pyplot()
    ignore = {"trial", "status", "kl_weight", "seed"} | set(COLUMNS[7:])

    def row_key(r: dict[str, Any]) -> tuple[Any, ...]:
        return tuple((k, v) for k, v in r.items() if k not in ignore)

    keys = list(dict.fromkeys(row_key(r) for r in rows))
    kls = sorted({r["kl_weight"] for r in rows})
    fig, axes = plt.subplots(len(keys), len(kls), figsize=(3.2 * len(kls), 2.5 * len(keys)), squeeze=False)
    state = json.loads((sweep_dir / "sweep.json").read_text())
    bank_of = {t["name"]: t["bank"] for t in state["trials"]}
    for i, key in enumerate(keys):
        for j, kl in enumerate(kls):
            ax = axes[i][j]
            trial = next((r for r in rows if row_key(r) == key and r["kl_weight"] == kl), None)
            if trial is None:
                ax.axis("off")
                continue
            base_r, base_valid = bank_rewards(sweep_dir / bank_of[trial["trial"]])
            final_r, final_valid = bank_rewards(sweep_dir / "trials" / trial["trial"] / "bank_final.parquet")
            both = np.concatenate([base_r[base_valid], final_r[final_valid]])
            bins = np.linspace(both.min(), both.max(), 50)
            ax.hist(base_r[base_valid], bins=bins, alpha=0.5, density=True, color="tab:gray", label="base")
            ax.hist(final_r[final_valid], bins=bins, alpha=0.5, density=True, color="tab:blue", label="fine-tuned")
            if trial["eta"] is not None and not math.isnan(trial["eta"]):
                ax.axvline(trial["eta"], color="black", linestyle="--", linewidth=0.8)
            ax.set_yscale("log")
            ax.set_title(f"{trial['side']} alpha={trial['alpha']:g} kl_weight={kl:g}", fontsize=8)
            ax.tick_params(labelsize=6)
            if i == 0 and j == 0:
                ax.legend(fontsize=6)
    fig.suptitle("reward histograms (dashed: threshold eta*)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(sweep_dir: str | Path, *, run: Any = None, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Write ``sweep_dir/report/`` (report.csv, report.md, cvar_vs_alpha.png, tradeoff.png, histograms.png) and
    log the files to ``run`` (a TrackedRun) when given; returns the table's rows."""
    sweep_dir = Path(sweep_dir)
    out = sweep_dir / "report"
    out.mkdir(exist_ok=True)
    rows = trial_rows(sweep_dir)
    table = _write_tables(rows, out)
    files = [out / "report.csv", out / "report.md"]
    done = [r for r in rows if r["status"] == "done"]
    if done:
        _plot_cvar_vs_alpha(done, out / "cvar_vs_alpha.png")
        _plot_tradeoff(done, out / "tradeoff.png")
        _plot_histograms(sweep_dir, done, out / "histograms.png")
        files += [out / "cvar_vs_alpha.png", out / "tradeoff.png", out / "histograms.png"]
    if run is not None:
        for f in files:
            run.log_artifact(f)
    log(table)
    log(KL_NOTE)
    return rows


def report_sweep(sweep_dir: str | Path, *, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """``tfft report DIR``: :func:`write_report`, logged to the sweep's parent run when it has one."""
    from pipelines.config import ConfigError
    from pipelines.sweep.tracking import RetryingRun

    sweep_dir = Path(sweep_dir)
    if not (sweep_dir / "sweep.json").is_file():
        raise ConfigError(f"'{sweep_dir}' holds no sweep.json: not the --out directory of a sweep")
    state = json.loads((sweep_dir / "sweep.json").read_text())
    parent = state.get("parent_run_id")
    return write_report(sweep_dir, run=RetryingRun(state["tracking_uri"] if parent else None, parent), log=log)
