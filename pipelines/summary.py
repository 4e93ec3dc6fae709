"""The run summary (``summary.json``) and the side-by-side table printed at the end of ``tfft run``."""

from __future__ import annotations

from typing import Any

__all__ = ["format_table", "flatten_stats"]

_COLUMNS = ("base", "finetuned", "target")


def _rows(stats: dict[str, Any]) -> list[tuple[str, float | None]]:
    rows: list[tuple[str, float | None]] = [("n_valid / n", None), ("mean", stats["mean"])]
    for side in ("right", "left"):
        for level, value in stats[f"cvar_{side}"].items():
            rows.append((f"{side}-CVaR({level})", value))
    return rows


def format_table(summary: dict[str, Any]) -> str:
    """Text table: one row per statistic, columns base / fine-tuned / exact target."""
    present = [c for c in _COLUMNS if summary.get(c)]
    header = f"{'statistic':<18}" + "".join(f"{c:>14}" for c in present)
    lines = [header, "-" * len(header)]
    ref = summary[present[0]]
    for i, (name, _) in enumerate(_rows(ref)):
        cells = []
        for c in present:
            s = summary[c]
            if i == 0:
                cells.append(f"{s['n_valid']}/{s['n']}")
            else:
                cells.append(f"{_rows(s)[i][1]:.4f}")
        lines.append(f"{name:<18}" + "".join(f"{v:>14}" for v in cells))
    th = summary.get("threshold")
    if th:
        lines.append("")
        lines.append(
            "threshold: eta* = {eta:.4f}, J(eta*) = {value:.4f}, target tail mass = {tail_mass:.4f}, "
            "ESS = {ess:.0f}, active fraction = {active_fraction:.4f}".format(**th)
        )
    return "\n".join(lines)


def flatten_stats(prefix: str, stats: dict[str, Any]) -> dict[str, float]:
    """``{"base.mean": ..., "base.cvar_right_0.1": ...}`` for MLflow metrics."""
    out = {f"{prefix}.mean": float(stats["mean"]), f"{prefix}.n_valid": float(stats["n_valid"])}
    for side in ("right", "left"):
        for level, value in stats[f"cvar_{side}"].items():
            out[f"{prefix}.cvar_{side}_{level}"] = float(value)
    return out
