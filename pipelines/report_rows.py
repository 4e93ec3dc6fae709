"""The rows of a sweep's report: one per trial of ``DIR/sweep.json``, with every CVaR at the trial's own ``alpha``
on both sides for the base model (its bank), the fine-tuned model (its final bank) and the exact target (the base
bank under the tilt weights, DESIGN §5), ``kl_target``, KL(p* ‖ q) of the exact target (:func:`tilt_kl`), and
``kept``, the state the guard kept (``last`` | ``best`` | ``base``: with ``base`` the trial's fine-tuned statistics
are its base model's).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf

from pipelines.outdir import trial_status
from tfft.objective import Tilt
from tfft.tail import cvar

__all__ = ["tilt_kl", "trial_rows", "bank_rewards", "COLUMNS", "INTERVAL_NOTE", "KL_NOTE"]

KL_NOTE = (
    "kl_target: KL(p*||q) of the exact target, estimated on the base bank as sum_i w_i log(N w_i) with the "
    "self-normalised tilt weights w_i ∝ exp(g(x_i)/kl_weight) over the N valid samples (not the fine-tuned model's KL)"
)
_MODELS = ("base", "finetuned", "target")
COLUMNS = (
    ["trial", "status", "kind", "side", "alpha", "kl_weight", "seed", "eta", "ess", "tail_mass", "kl_target"]
    + [f"{m}_mean" for m in _MODELS]
    + [f"{m}_cvar_{s}" for s in ("right", "left") for m in _MODELS]
    + [f"target_cvar_{s}_{b}" for s in ("right", "left") for b in ("lo", "hi")]
    + ["wall_seconds", "kept"]
)
INTERVAL_NOTE = (
    "target_cvar_*_lo/hi: the percentile-bootstrap interval of the target CVaR over the base bank, as recorded in "
    "the trial's summary.json (tfft.interval.target_interval); it measures the bank's sampling variability and "
    "does not correct the low bias of self-normalised tail estimates (read it with the ESS); empty when the "
    "trial's alpha is not among the recorded levels"
)


def tilt_kl(weights: np.ndarray) -> float:
    """KL(p* ‖ q) from self-normalised importance weights of p* on N samples of q: sum_i w_i log(N w_i).

    Args:
        weights: shape (N,), non-negative, summing to 1 (zero weights contribute nothing).
    """
    w = np.asarray(weights, dtype=np.float64)
    w = w[w > 0]
    return float(np.sum(w * np.log(len(weights) * w)))


def bank_rewards(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(rewards (n,), valid and finite (n,)) of the bank file at ``path``."""
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=["reward", "valid"])
    reward = table.column("reward").to_numpy(zero_copy_only=False).astype(np.float64)
    valid = table.column("valid").to_numpy(zero_copy_only=False).astype(bool) & np.isfinite(reward)
    return reward, valid


def _trial_row(sweep_dir: Path, trial: dict[str, Any], banks: dict[str, Any]) -> dict[str, Any]:
    trial_dir = sweep_dir / "trials" / trial["name"]
    cfg = OmegaConf.to_container(OmegaConf.load(trial_dir / "config.yaml"))
    section = cfg["objective"]  # the trial's settings (its tilt, with its eta, is in summary.json)
    row: dict[str, Any] = {
        "trial": trial["name"],
        "kind": section["kind"],
        "side": section["side"],
        "alpha": section["alpha"],
        "kl_weight": section["kl_weight"],
        "seed": cfg["seed"],
        **{k: v for k, v in trial["params"].items() if k.split(".")[-1] not in COLUMNS},
    }
    row["status"] = trial_status(trial_dir)
    if row["status"] != "done":
        return row
    summary = json.loads((trial_dir / "summary.json").read_text())
    threshold = summary.get("threshold") or {}
    row.update({k: threshold.get(k, math.nan) for k in ("eta", "ess", "tail_mass")})
    row.update({f"{m}_mean": summary[m]["mean"] for m in _MODELS})
    row["wall_seconds"] = summary.get("wall_seconds", math.nan)
    # the state the guard kept: last | best | base (no window beat the base, or the evaluation check set the
    # fine-tuned model aside: then the trial's "finetuned" statistics are the base's)
    row["kept"] = (summary.get("guard") or {}).get("kept", "")
    if trial["bank"] not in banks:
        banks[trial["bank"]] = bank_rewards(sweep_dir / trial["bank"])
    base_r, base_valid = banks[trial["bank"]]
    final_r, final_valid = bank_rewards(trial_dir / "bank_final.parquet")
    w = Tilt.from_dict(summary["objective"]).weights(base_r, base_valid)[base_valid]
    row["kl_target"] = tilt_kl(w)
    interval = summary.get("target_interval") or {}
    for side in ("right", "left"):
        alpha = row["alpha"]
        row[f"base_cvar_{side}"] = cvar(base_r[base_valid], side=side, alpha=alpha)
        row[f"finetuned_cvar_{side}"] = cvar(final_r[final_valid], side=side, alpha=alpha)
        row[f"target_cvar_{side}"] = cvar(base_r[base_valid], side=side, alpha=alpha, weights=w)
        for bound in ("lo", "hi"):
            recorded = interval.get(bound, {}).get(f"cvar_{side}", {})
            row[f"target_cvar_{side}_{bound}"] = recorded.get(f"{float(alpha):g}", math.nan)
    return row


def trial_rows(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """One row per trial listed in ``sweep_dir/sweep.json`` (columns :data:`COLUMNS` plus other swept keys);
    trials without a ``summary.json`` have a status and no statistics."""
    sweep_dir = Path(sweep_dir)
    state = json.loads((sweep_dir / "sweep.json").read_text())
    banks: dict[str, Any] = {}
    return [_trial_row(sweep_dir, trial, banks) for trial in state["trials"]]
