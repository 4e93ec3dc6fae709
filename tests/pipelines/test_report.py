"""``tfft report`` on a synthetic sweep directory (no Ray): table values, KL estimate, files, MLflow."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from omegaconf import OmegaConf

from pipelines.cli import main
from pipelines.config import to_yaml
from pipelines.report import report_sweep
from pipelines.report_rows import COLUMNS, KL_NOTE, tilt_kl, trial_rows
from pipelines.schema import Config
from tfft.tail import cvar, solve_threshold
from tfft.target import summarize, target_summary, tilt_weights

ALPHAS, KL_WEIGHTS = (0.1, 0.2), (2.0, 8.0)


def _bank(path: Path, reward: np.ndarray) -> None:
    valid = np.isfinite(reward)
    pq.write_table(pa.table({"reward": reward, "valid": valid}), path)


def _name(alpha: float, kl: float) -> str:
    return f"alpha={alpha:g}_kl_weight={kl:g}"


@pytest.fixture()
def sweep_dir(tmp_path):
    """Four done trials (right side), one failed and one never run, over a shared base bank with NaNs."""
    rng = np.random.default_rng(0)
    base = rng.normal(size=4000)
    base[:40] = np.nan  # invalid samples
    _bank(tmp_path / "bank_base.parquet", base)
    trials = []
    for alpha in ALPHAS:
        for kl in KL_WEIGHTS:
            name = _name(alpha, kl)
            trials.append({"name": name, "params": {"objective.alpha": alpha, "objective.kl_weight": kl},
                           "bank": "bank_base.parquet"})
            d = tmp_path / "trials" / name
            d.mkdir(parents=True)
            cfg = Config()
            cfg.objective.alpha, cfg.objective.kl_weight = alpha, kl
            (d / "config.yaml").write_text(to_yaml(cfg))
            th = solve_threshold(base, side="right", alpha=alpha, kl_weight=kl, valid=np.isfinite(base))
            objective = {"eta": th.eta, "side": "right", "alpha": alpha, "kl_weight": kl}
            final = rng.normal(loc=1.0 / kl, size=3000)  # smaller kl_weight: further from the base
            _bank(d / "bank_final.parquet", final)
            summary = {
                "threshold": th.to_dict(),
                "base": summarize(base).to_dict(),
                "finetuned": summarize(final).to_dict(),
                "target": target_summary(base, valid=np.isfinite(base), **objective).to_dict(),
                "objective": {"kind": "cvar", **objective},
                "wall_seconds": 12.5,
                "guard": {"kept": "base" if (alpha, kl) == (ALPHAS[0], KL_WEIGHTS[1]) else "last"},
            }
            (d / "summary.json").write_text(json.dumps(summary))
    for name, status in (("alpha=0.3_kl_weight=2", "failed"), ("alpha=0.3_kl_weight=8", None)):
        d = tmp_path / "trials" / name
        d.mkdir(parents=True)
        cfg = Config()
        cfg.objective.alpha, cfg.objective.kl_weight = 0.3, float(name.split("=")[-1])
        (d / "config.yaml").write_text(to_yaml(cfg))
        if status:
            (d / "status.json").write_text(json.dumps({"status": status, "error": "boom"}))
        trials.append({"name": name, "params": {"objective.alpha": 0.3, "objective.kl_weight": cfg.objective.kl_weight},
                       "bank": "bank_base.parquet"})
    (tmp_path / "sweep.json").write_text(json.dumps({"tracking_uri": "", "parent_run_id": None, "trials": trials}))
    return tmp_path, base


def test_tilt_kl_matches_closed_forms():
    assert tilt_kl(np.full(10, 0.1)) == pytest.approx(0.0, abs=1e-12)
    w = np.zeros(10)
    w[:4] = 0.25  # p* uniform on 4 of the 10 samples: KL = log(10 / 4)
    assert tilt_kl(w) == pytest.approx(math.log(2.5))
    # Gaussian tilt: q = N(0, 1), w ∝ exp(c x) gives p* = N(c, 1), KL = c^2 / 2
    x = np.random.default_rng(1).normal(size=400_000)
    w = np.exp(0.5 * x)
    assert tilt_kl(w / w.sum()) == pytest.approx(0.125, rel=0.05)


def test_rows_hold_each_trials_cvars_at_its_own_alpha(sweep_dir):
    path, base = sweep_dir
    rows = {r["trial"]: r for r in trial_rows(path)}
    valid = np.isfinite(base)
    assert len(rows) == 6
    assert rows["alpha=0.3_kl_weight=2"]["status"] == "failed" and rows["alpha=0.3_kl_weight=8"]["status"] == "not run"
    for alpha in ALPHAS:
        for kl in KL_WEIGHTS:
            r = rows[_name(alpha, kl)]
            assert r["status"] == "done" and (r["side"], r["alpha"], r["kl_weight"], r["seed"]) == ("right", alpha, kl, 0)
            final = pq.read_table(path / "trials" / r["trial"] / "bank_final.parquet").column("reward").to_numpy()
            w = tilt_weights(base, eta=r["eta"], side="right", alpha=alpha, kl_weight=kl, valid=valid)
            for side in ("right", "left"):
                assert r[f"base_cvar_{side}"] == pytest.approx(cvar(base[valid], side=side, alpha=alpha))
                assert r[f"finetuned_cvar_{side}"] == pytest.approx(cvar(final, side=side, alpha=alpha))
                assert r[f"target_cvar_{side}"] == pytest.approx(cvar(base[valid], side=side, alpha=alpha, weights=w[valid]))
            n = int(valid.sum())
            kl_direct = float(np.sum(w[w > 0] * np.log(n * w[w > 0])))
            assert r["kl_target"] == pytest.approx(kl_direct) and r["kl_target"] > 0
            assert r["kept"] == ("base" if (alpha, kl) == (ALPHAS[0], KL_WEIGHTS[1]) else "last")
        # a weaker KL weight lets the target move further from the base
        assert rows[_name(alpha, KL_WEIGHTS[0])]["kl_target"] > rows[_name(alpha, KL_WEIGHTS[1])]["kl_target"]


def test_report_command_writes_tables_and_figures(sweep_dir, capsys):
    path, _ = sweep_dir
    assert main(["report", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "| trial | status |" in printed and KL_NOTE in printed
    out = path / "report"
    with open(out / "report.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["trial"] for r in rows][:4] == [_name(a, k) for a in ALPHAS for k in KL_WEIGHTS]
    assert set(COLUMNS) <= set(rows[0]) and rows[4]["finetuned_cvar_right"] == ""
    md = (out / "report.md").read_text()
    assert KL_NOTE in md and md.count("\n| alpha=") == 6
    for png in ("cvar_vs_alpha.png", "tradeoff.png", "histograms.png"):
        assert (out / png).stat().st_size > 10_000


def test_report_of_a_directory_without_a_sweep_exits_2(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "sweep.json" in capsys.readouterr().err


def test_report_is_logged_to_the_parent_run(sweep_dir):
    from mlflow.tracking import MlflowClient

    from pipelines.tracking import open_run

    path, _ = sweep_dir
    uri = f"sqlite:///{path / 'mlflow.db'}"
    parent = open_run(uri, "tfft", "parent")
    state = json.loads((path / "sweep.json").read_text())
    state.update(tracking_uri=uri, parent_run_id=parent.run_id)
    (path / "sweep.json").write_text(json.dumps(state))
    report_sweep(path, log=lambda s: None)
    logged = {a.path for a in MlflowClient(tracking_uri=uri).list_artifacts(parent.run_id)}
    assert {"report.csv", "report.md", "cvar_vs_alpha.png", "tradeoff.png", "histograms.png"} <= logged
    assert OmegaConf.load(path / "trials" / _name(0.1, 2.0) / "config.yaml").objective.alpha == 0.1
