"""The run summary (``summary.json``) and the side-by-side table printed at the end of ``tfft run``."""

from __future__ import annotations

from typing import Any

__all__ = ["format_table", "flatten_interval", "flatten_stats"]

_COLUMNS = ("base", "finetuned", "target")


def _rows(stats: dict[str, Any]) -> list[tuple[str, float | None]]:
    rows: list[tuple[str, float | None]] = [("n_valid / n", None), ("mean", stats["mean"])]
    for side in ("right", "left"):
        for level, value in stats[f"cvar_{side}"].items():
            rows.append((f"{side}-CVaR({level})", value))
    return rows


def _interval_cell(interval: dict[str, Any], row: int, name: str) -> str:
    """``[lo, hi]`` of the statistic in row ``row`` (named ``name``) of a ``target_interval`` summary entry."""
    if row == 0:
        return f"n_boot {interval['n_boot']}"
    if name == "mean":
        lo, hi = interval["lo"]["mean"], interval["hi"]["mean"]
    else:
        side, level = name.split("-CVaR(")
        key, level = f"cvar_{side}", level.rstrip(")")
        if level not in interval["lo"].get(key, {}):
            return ""
        lo, hi = interval["lo"][key][level], interval["hi"][key][level]
    return f"[{lo:.4f}, {hi:.4f}]"


def format_table(summary: dict[str, Any]) -> str:
    """Text table: one row per statistic, columns base / fine-tuned / exact target, and the target's bootstrap
    interval (``summary["target_interval"]``, :func:`tfft.target.target_interval`) when the summary has one."""
    present = [c for c in _COLUMNS if summary.get(c)]
    interval = summary.get("target_interval") if "target" in present else None
    header = f"{'statistic':<18}" + "".join(f"{c:>14}" for c in present)
    if interval:
        label = f"target {interval['confidence']:.0%} CI"
        header += f"{label:>24}"
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
        line = f"{name:<18}" + "".join(f"{v:>14}" for v in cells)
        if interval:
            line += f"{_interval_cell(interval, i, name):>24}"
        lines.append(line)
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


def flatten_interval(prefix: str, interval: dict[str, Any]) -> dict[str, float]:
    """``{"target_lo.mean": ..., "target_hi.cvar_right_0.1": ...}`` for MLflow metrics, from the ``to_dict()`` of a
    :class:`tfft.target.TargetInterval`; names follow :func:`flatten_stats` with ``_lo`` / ``_hi`` on the prefix."""
    out: dict[str, float] = {}
    for bound in ("lo", "hi"):
        stats = interval[bound]
        out[f"{prefix}_{bound}.mean"] = float(stats["mean"])
        for side in ("right", "left"):
            for level, value in stats[f"cvar_{side}"].items():
                out[f"{prefix}_{bound}.cvar_{side}_{level}"] = float(value)
    return out
