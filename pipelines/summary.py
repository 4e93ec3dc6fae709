"""The run summary (``summary.json``) and the side-by-side table printed at the end of ``tfft run``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from tfft.invalid import assign_invalid, tail_both_ways
from tfft.target import summarize

__all__ = [
    "format_table", "flatten_interval", "flatten_stats", "invalid_record", "flatten_invalid", "term_record",
    "flatten_terms",
]

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
    interval (``summary["target_interval"]``, :func:`tfft.interval.target_interval`) when the summary has one."""
    present = [c for c in _COLUMNS if summary.get(c)]
    interval = summary.get("target_interval") if "target" in present else None
    header = f"{'statistic':<18}" + "".join(f"{c:>14}" for c in present)
    if interval:
        label = f"target {interval['confidence']:.0%} CI"
        header += f"{label:>24}"
    lines = [header, "-" * len(header)]
    ref = summary[present[0]]
    from_audit = set(summary.get("screened_from_audit") or ())
    for i, (name, _) in enumerate(_rows(ref)):
        cells = []
        for c in present:
            s = summary[c]
            if i == 0:
                cells.append(f"{s['n_valid']}/{s['n']}")
            else:
                mark = "*" if f"{c}.{_entry(name)}" in from_audit else ""
                cells.append(f"{_rows(s)[i][1]:.4f}{mark}")
        line = f"{name:<18}" + "".join(f"{v:>14}" for v in cells)
        if interval:
            line += f"{_interval_cell(interval, i, name):>24}"
        lines.append(line)
    if summary.get("screen"):
        lines.append("")
        lines.append(_screen_line(summary["screen"], bool(from_audit)))
    invalid = summary.get("invalid")
    if invalid:
        lines.append("")
        lines.append(_invalid_line(invalid))
    if summary.get("terms"):
        lines.append("")
        lines.extend(_term_line(name, entry) for name, entry in summary["terms"].items())
    th = summary.get("threshold")
    if th:
        lines.append("")
        lines.append(
            "threshold: eta* = {eta:.4f}, J(eta*) = {value:.4f}, target tail mass = {tail_mass:.4f}, "
            "ESS = {ess:.0f}, active fraction = {active_fraction:.4f}".format(**th)
        )
    if summary.get("per_condition"):
        lines.append("")
        lines.extend(_condition_lines(summary))
    return "\n".join(lines)


def _condition_lines(summary: dict[str, Any]) -> list[str]:
    """One block per condition: its threshold, then mean and the objective side's CVaRs, base / fine-tuned /
    target (a few lines each, so ten conditions stay readable)."""
    objective = summary.get("objective") or {}
    side = objective.get("side", "right") if objective.get("kind") == "cvar" else "right"
    header = f"{'per condition':<18}" + "".join(f"{c:>14}" for c in _COLUMNS)
    lines = [header, "-" * len(header)]
    for value, block in summary["per_condition"].items():
        th = block.get("threshold")
        extra = "" if not th else f"  (eta* = {th['eta']:.4f}, ESS = {th['ess']:.0f})"
        lines.append(f"condition {value}{extra}")
        rows = [("  n_valid / n", [f"{block[c]['n_valid']}/{block[c]['n']}" for c in _COLUMNS]),
                ("  mean", [f"{block[c]['mean']:.4f}" for c in _COLUMNS])]
        for level in block["base"][f"cvar_{side}"]:
            rows.append((f"  {side}-CVaR({level})", [f"{block[c][f'cvar_{side}'][level]:.4f}" for c in _COLUMNS]))
        lines.extend(f"{name:<18}" + "".join(f"{v:>14}" for v in cells) for name, cells in rows)
    return lines


def _entry(row_name: str) -> str:
    """A table row's name as a ``screened_from_audit`` entry: 'mean', 'right-CVaR(0.1)' -> 'cvar_right.0.1'."""
    if row_name == "mean":
        return "mean"
    side, level = row_name.split("-CVaR(")
    return f"cvar_{side}.{level.rstrip(')')}"


def _screen_line(screen: dict[str, Any], marked: bool) -> str:
    """Screened evaluation's accounting per bank, and what the table's stars mean."""
    parts = []
    for label, record in screen.items():
        if isinstance(record, dict) and "expensive_calls" in record:
            n = record["expensive_calls"] + record["skipped"]
            parts.append(f"{label} {record['expensive_calls']}/{n} expensive calls ({record['audited']} audited"
                         + (", full evaluation" if record.get("full") else
                            f", miss rate {record['miss_rate']:.3f} <= {record['miss_rate_upper']:.3f}") + ")")
    note = "; * from the random audit only (summary.json: screened_from_audit, audit_interval)" if marked else ""
    return "screened evaluation: " + "; ".join(parts) + note


def flatten_stats(prefix: str, stats: dict[str, Any]) -> dict[str, float]:
    """``{"base.mean": ..., "base.cvar_right_0.1": ...}`` for MLflow metrics."""
    out = {f"{prefix}.mean": float(stats["mean"]), f"{prefix}.n_valid": float(stats["n_valid"])}
    for side in ("right", "left"):
        for level, value in stats[f"cvar_{side}"].items():
            out[f"{prefix}.cvar_{side}_{level}"] = float(value)
    return out


def flatten_interval(prefix: str, interval: dict[str, Any]) -> dict[str, float]:
    """``{"target_lo.mean": ..., "target_hi.cvar_right_0.1": ...}`` for MLflow metrics, from the ``to_dict()`` of a
    :class:`tfft.interval.TargetInterval`; names follow :func:`flatten_stats` with ``_lo`` / ``_hi`` on the prefix."""
    out: dict[str, float] = {}
    for bound in ("lo", "hi"):
        stats = interval[bound]
        out[f"{prefix}_{bound}.mean"] = float(stats["mean"])
        for side in ("right", "left"):
            for level, value in stats[f"cvar_{side}"].items():
                out[f"{prefix}_{bound}.cvar_{side}_{level}"] = float(value)
    return out


def invalid_record(invalid_reward: float | None, banks: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, Any]:
    """``summary.json["invalid"]``: the rule for failed samples and what it touched, per bank.

    ``banks`` maps a label ('base', 'finetuned') to the bank's raw (reward (n,), valid (n,)). The record holds
    ``rule`` ('exclude' | 'assign'), ``value``, ``invalid_fraction`` per bank and, for each bank where any sample
    failed, ``left_tail_both_ways[label]``: the left CVaR with failures excluded and assigned
    (`tfft.invalid.tail_both_ways`).
    """
    fractions, both = {}, {}
    rule = "exclude" if invalid_reward is None else "assign"
    for label, (reward, valid) in banks.items():
        fractions[label] = assign_invalid(reward, valid, invalid_reward)[2].invalid_fraction
        ways = tail_both_ways(reward, valid, invalid_reward)
        if ways is not None:
            both[label] = ways.to_dict()
    return {"rule": rule, "value": invalid_reward, "invalid_fraction": fractions, "left_tail_both_ways": both}


def flatten_invalid(record: dict[str, Any]) -> dict[str, float]:
    """MLflow metrics of :func:`invalid_record`: ``invalid.assigned`` (1 under 'assign'), ``invalid.value`` (when
    assigned), ``<label>.invalid_fraction`` and ``<label>.cvar_left_<level>_{excluded,assigned}``."""
    out = {"invalid.assigned": float(record["rule"] == "assign")}
    if record["value"] is not None:
        out["invalid.value"] = float(record["value"])
    for label, fraction in record["invalid_fraction"].items():
        out[f"{label}.invalid_fraction"] = float(fraction)
    for label, ways in record["left_tail_both_ways"].items():
        for rule in ("excluded", "assigned"):
            for level, value in ways[rule].items():
                out[f"{label}.cvar_left_{level}_{rule}"] = float(value)
    return out


def _invalid_line(record: dict[str, Any]) -> str:
    fractions = ", ".join(f"{label} {f:.2%}" for label, f in record["invalid_fraction"].items())
    if record["rule"] == "exclude":
        head = f"failed samples: excluded from every statistic (invalid: {fractions})"
    else:
        head = f"failed samples: counted at reward {record['value']:g} (invalid: {fractions})"
    parts = [head]
    for label, ways in record["left_tail_both_ways"].items():
        level = "0.1" if "0.1" in ways["excluded"] else next(iter(ways["excluded"]))
        parts.append(f"{label} left-CVaR({level}) {ways['excluded'][level]:.4f} excluded / "
                     f"{ways['assigned'][level]:.4f} with failures at {ways['value_used']:.4g}")
    return "; ".join(parts)


def term_record(
    terms: Mapping[str, Mapping[str, np.ndarray]], weights: Mapping[str, float] | None = None
) -> dict[str, dict[str, Any]]:
    """``summary.json["terms"]``: each reward term's statistics per bank (`rewards.compose.WeightedSum`).

    ``terms`` maps a bank label ('base', 'finetuned') to its per-sample terms (``Bank.terms``: name -> (n,)
    float64, NaN where the term failed); ``weights`` maps a name to its weight (None where unknown). Returns
    ``{name: {"weight": w, "base": S, "finetuned": S}}`` with S the ``TailSummary.to_dict()`` of the term's
    values over the samples where it is valid (`tfft.target.summarize`), in the order the names first
    appear; empty when no bank has terms.
    """
    names = list(dict.fromkeys(name for values in terms.values() for name in values))
    record: dict[str, dict[str, Any]] = {}
    for name in names:
        weight = None if weights is None or name not in weights else float(weights[name])
        entry: dict[str, Any] = {"weight": weight}
        for label, values in terms.items():
            if name in values and np.size(values[name]):
                entry[label] = summarize(np.asarray(values[name], dtype=np.float64)).to_dict()
        record[name] = entry
    return record


def flatten_terms(record: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """MLflow metrics of :func:`term_record`: ``<label>.term.<name>.mean``, ``.n_valid``, ``.cvar_right_0.1``..."""
    out: dict[str, float] = {}
    for name, entry in record.items():
        for label, stats in entry.items():
            if label != "weight":
                out.update(flatten_stats(f"{label}.term.{name}", stats))
    return out


def _term_line(name: str, entry: Mapping[str, Any]) -> str:
    """``term smooth (weight 0.5): mean 1.2345 (base) -> 2.3456 (finetuned)``."""
    weight = entry.get("weight")
    head = f"term {name}" + ("" if weight is None else f" (weight {weight:g})")
    means = " -> ".join(f"{stats['mean']:.4f} ({label})" for label, stats in entry.items() if label != "weight")
    return f"{head}: mean {means}"
