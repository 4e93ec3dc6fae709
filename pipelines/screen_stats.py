"""Summary statistics of screened banks: exact from the certified tail, or from the audit (`pipelines.screening`).

A screened bank's working view puts every unevaluated sample at the far end of the evaluated ones. A statistic on
the screened side at level L (weights w: uniform for a model's own bank, the tilt for the target) is exact when
its tail lies inside the certified tail (beyond the bank's cut c, the threshold its certificate was solved at):

    covered(L)  <=>  sum_i w_i 1{r_i beyond c} / sum_i w_i  >=  L (1 - tolerance),

i.e. at most ``tolerance`` of the statistic's tail mass falls where samples were skipped (the certificate's own
margin). Every other statistic (the mean, the opposite side's CVaR, a screened-side CVaR that is not covered) is
computed from the audit alone, a uniform random subset evaluated in full, with a percentile-bootstrap interval,
and is named in ``summary.json["screened_from_audit"]`` (``"<column>.mean"``, ``"<column>.cvar_<side>.<level>"``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipelines.bankio import Bank
from tfft.objective import Tilt
from tfft.target import summarize

__all__ = ["covered", "check_rows", "audit_entries", "plain_interval", "audit_statistics", "flatten_screen", "RECORD_KEYS"]

RECORD_KEYS = ("expensive_calls", "skipped", "audited", "miss_rate", "miss_rate_upper")


def covered(reward: np.ndarray, weights: np.ndarray, *, side: str, level: float, cut: float, tolerance: float) -> bool:
    """True when the level-tail of (reward (n,), weights (n,)) lies beyond ``cut`` up to ``tolerance`` of its mass."""
    w = np.asarray(weights, dtype=np.float64)
    beyond = reward > cut if side == "right" else reward < cut
    return bool(w[beyond].sum() / w.sum() >= level * (1.0 - tolerance))


Rows = tuple[np.ndarray, np.ndarray]  # (rewards (m,), mask (m,))


def check_rows(bank: Bank, reward: np.ndarray, valid: np.ndarray, *, side: str, alpha: float,
               tolerance: float) -> tuple[Rows, Rows, str]:
    """The rows the evaluation check (`pipelines.eval_guard`) reads from one bank, scored as (reward (n,), valid
    (n,)): (rows for the objective's statistic, rows for the valid fraction, where the statistic comes from).

    A plain bank, or a screened one evaluated in full: every row ("all"). A screened bank whose certified tail
    covers the objective's alpha-tail (:func:`covered`, uniform weights): its working view, exact for the CVaR
    ("certified tail"); otherwise the audit ("audit"). The valid fraction of a screened bank is always the
    audit's: its skipped rows were never scored and count as valid in the working view."""
    if not bank.screened or bank.screening is None or bank.screening.get("full"):
        return (reward, valid), (reward, valid), "all"
    assert bank.audited is not None
    audit = (reward[bank.audited], valid[bank.audited])
    if covered(np.where(valid, reward, np.nan), valid.astype(np.float64), side=side, level=alpha,
               cut=bank.screening["eta"], tolerance=tolerance):
        return (reward, valid), audit, "certified tail"
    return audit, audit, "audit"


def _entries(stats: dict[str, Any]) -> list[str]:
    return ["mean"] + [f"cvar_{side}.{level}" for side in ("right", "left") for level in stats[f"cvar_{side}"]]


def _get(stats: dict[str, Any], entry: str) -> float:
    key, _, level = entry.partition(".")
    return stats[key] if not level else stats[key][level]


def _set(stats: dict[str, Any], entry: str, value: float) -> None:
    key, _, level = entry.partition(".")
    if level:
        stats[key][level] = float(value)
    else:
        stats[key] = float(value)


def audit_entries(
    stats: dict[str, Any], reward: np.ndarray, weights: np.ndarray, *, side: str, cut: float, tolerance: float
) -> list[str]:
    """The entries of a TailSummary dict (``stats``) that a screened bank cannot give exactly (module doc)."""
    out = []
    for entry in _entries(stats):
        key, _, level = entry.partition(".")
        if key != f"cvar_{side}" or not covered(reward, weights, side=side, level=float(level), cut=cut,
                                                tolerance=tolerance):
            out.append(entry)
    return out


def plain_interval(reward: np.ndarray, *, n_boot: int = 200, confidence: float = 0.9, seed: int = 0) -> dict[str, Any]:
    """Percentile bootstrap of `tfft.target.summarize` over the rewards (m,): {"lo": stats, "hi": stats}."""
    rng = np.random.default_rng(seed)
    rows = [summarize(reward[rng.integers(0, reward.size, reward.size)]).to_dict() for _ in range(n_boot)]
    bounds: dict[str, Any] = {}
    for name, q in (("lo", (1 - confidence) / 2), ("hi", (1 + confidence) / 2)):
        stats = {k: rows[0][k] if not isinstance(rows[0][k], dict) else dict(rows[0][k]) for k in ("mean", "cvar_right", "cvar_left")}
        for entry in _entries(stats):
            _set(stats, entry, np.quantile([_get(r, entry) for r in rows], q))
        bounds[name] = stats
    return bounds


def _bank_record(bank: Bank) -> dict[str, Any]:
    return {k: bank.screening[k] for k in (*RECORD_KEYS, "full", "eta", "certified")}


def audit_statistics(
    banks: dict[str, tuple[Bank, np.ndarray, np.ndarray]],
    stats: dict[str, dict[str, Any]],
    interval: dict[str, Any],
    *,
    tilt: Tilt,
    tolerance: float,
    seed: int = 0,
) -> dict[str, Any]:
    """Replace, in ``stats`` ({"base", "finetuned", "target"}: TailSummary dicts) and in the target's bootstrap
    ``interval`` (its ``to_dict()``), every entry a screened bank cannot give exactly by its audit estimate.

    ``banks``: label ('base', 'finetuned') -> (working view, scored reward (n,), scored mask (n,)); ``tilt``: the
    objective whose target the ``target`` column describes. Returns the
    summary's additions: ``screen`` (the base bank's accounting at the top level, and per bank),
    ``screened_from_audit`` and ``audit_interval`` ({column: {"lo": stats, "hi": stats}} of the audit estimates).
    """
    from_audit: list[str] = []
    intervals: dict[str, Any] = {}
    jobs = [("base", "base", None), ("finetuned", "finetuned", None), ("target", "base", tilt)]
    for column, label, tilted in jobs:
        bank, reward, valid = banks[label]
        if not bank.screened or bank.screening["full"]:
            continue
        weights = valid.astype(np.float64) if tilted is None else tilted.weights(reward, valid)
        side, cut = bank.screening["certified"]["side"], bank.screening["eta"]
        entries = audit_entries(stats[column], np.where(valid, reward, np.nan), weights, side=side, cut=cut,
                                tolerance=tolerance)
        audit = bank.audited & valid & np.isfinite(reward)
        r = reward[audit]
        if tilted is None:
            estimate, bounds = summarize(r).to_dict(), plain_interval(r, seed=seed)
        else:
            boot = tilted.target_interval(r, seed=seed)
            estimate, bounds = boot.estimate.to_dict(), boot.to_dict()
            for entry in entries:  # the target's interval: the audit's bounds where the audit gives the estimate
                for end in ("lo", "hi"):
                    _set(interval[end], entry, _get(bounds[end], entry))
        for entry in entries:
            _set(stats[column], entry, _get(estimate, entry))
        from_audit += [f"{column}.{entry}" for entry in entries]
        intervals[column] = {"lo": bounds["lo"], "hi": bounds["hi"], "n": int(audit.sum())}
    records = {label: _bank_record(bank) for label, (bank, _, _) in banks.items() if bank.screened}
    if not records:
        return {}
    top = records.get("base") or next(iter(records.values()))
    screen = {**{k: top[k] for k in RECORD_KEYS}, **records}
    return {"screen": screen, "screened_from_audit": from_audit, "audit_interval": intervals}


def flatten_screen(extra: dict[str, Any]) -> dict[str, float]:
    """MLflow metrics of :func:`audit_statistics`' additions: ``screen.<key>``, ``screen.<bank>.<key>`` (and
    ``.full``, ``.eta``), ``audit_lo.<column>.<entry>`` / ``audit_hi...``, ``screen.from_audit`` (a count)."""
    if not extra:
        return {}
    screen = extra["screen"]
    out = {f"screen.{k}": float(screen[k]) for k in RECORD_KEYS}
    for label, record in screen.items():
        if isinstance(record, dict):
            out.update({f"screen.{label}.{k}": float(record[k]) for k in (*RECORD_KEYS, "full", "eta")})
    for column, bounds in extra["audit_interval"].items():
        for end in ("lo", "hi"):
            for entry in _entries(bounds[end]):
                out[f"audit_{end}.{column}.{entry.replace('.', '_')}"] = float(_get(bounds[end], entry))
    out["screen.from_audit"] = float(len(extra["screened_from_audit"]))
    return out
