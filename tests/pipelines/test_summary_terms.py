"""Per-term statistics of a run (`pipelines.summary.term_record`), their MLflow metrics and table lines."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipelines.summary import flatten_terms, format_table, term_record
from tfft.target import summarize


def _terms():
    rng = np.random.default_rng(0)
    tail = rng.normal(size=500)
    tail[:20] = np.nan  # the term failed on these samples
    return {
        "base": {"tail": tail, "dist": -rng.random(500)},
        "finetuned": {"tail": tail + 1.0, "dist": -rng.random(500) / 2},
    }


def test_record_summarises_each_term_over_its_valid_samples_with_its_weight():
    terms = _terms()
    record = term_record(terms, {"tail": 1.0, "dist": 0.5})
    assert list(record) == ["tail", "dist"] and record["dist"]["weight"] == 0.5
    tail = terms["base"]["tail"]
    assert record["tail"]["base"] == summarize(tail).to_dict()
    assert record["tail"]["base"]["mean"] == pytest.approx(np.nanmean(tail))
    assert record["tail"]["base"]["n"] == 500 and record["tail"]["base"]["n_valid"] == 480
    assert record["tail"]["finetuned"]["mean"] == pytest.approx(record["tail"]["base"]["mean"] + 1.0)
    assert term_record({"base": {}, "finetuned": {}}) == {}  # no terms: nothing to add to the summary
    assert term_record(terms)["tail"]["weight"] is None  # a reward that names no weights


def test_metrics_and_table_lines():
    record = term_record(_terms(), {"tail": 1.0, "dist": 0.5})
    metrics = flatten_terms(record)
    assert metrics["base.term.tail.mean"] == record["tail"]["base"]["mean"]
    assert metrics["finetuned.term.dist.cvar_right_0.1"] == record["dist"]["finetuned"]["cvar_right"]["0.1"]
    assert metrics["base.term.tail.n_valid"] == 480.0 and not any("weight" in k for k in metrics)
    stats = summarize(np.arange(10.0)).to_dict()
    lines = format_table({"base": stats, "finetuned": stats, "terms": record}).splitlines()
    tail = record["tail"]
    assert f"term tail (weight 1): mean {tail['base']['mean']:.4f} (base) -> {tail['finetuned']['mean']:.4f} (finetuned)" in lines
    assert sum(line.startswith("term ") for line in lines) == 2
    assert not any(line.startswith("term ") for line in format_table({"base": stats}).splitlines())


class _Run:
    """Stands in for a TrackedRun: keeps the metrics and artifacts it is given."""

    def __init__(self) -> None:
        self.metrics: dict[str, float] = {}
        self.artifacts: list[str] = []

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.metrics.update(metrics)

    def log_artifact(self, path) -> None:
        self.artifacts.append(str(path))


def test_a_run_records_the_terms_of_a_composite_reward(tmp_path):
    """`pipelines.stages.record.record_summary` (the end of `tfft run`) on banks with term columns, without Ray."""
    from pipelines.bankio import Bank
    from pipelines.config import load_config
    from pipelines.stages.record import record_summary as _record
    from pipelines.stages.threshold import tilt_of
    from rewards.base import load_reward

    cfg = load_config(Path(__file__).parents[2] / "tune_configs/toy2d_composite.yaml", ["objective.kind=mean"])
    reward = load_reward(cfg.reward.target, cfg.reward.kwargs)
    banks = []
    for shift in (0.0, 0.5):
        x = np.random.default_rng(1).normal(size=(400, 2)) + shift
        res = reward.evaluate_detailed(x)
        n = len(x)
        banks.append(Bank(np.arange(n), x, res.rewards, res.valid, np.asarray(res.errors, dtype=object),
                          res.seconds, res.attempts, np.zeros(n, dtype=bool), terms=res.terms))
    run = _Run()
    summary = _record(cfg, tmp_path, run, banks[0], banks[1], None, tilt_of(cfg), "adjoint")
    assert list(summary["terms"]) == ["TailReward2D", "distance"]
    assert summary["terms"]["distance"]["weight"] == 0.2
    dist = -(banks[1].x ** 2).sum(1)
    assert summary["terms"]["distance"]["finetuned"]["mean"] == pytest.approx(dist.mean())
    assert run.metrics["finetuned.term.distance.mean"] == pytest.approx(dist.mean())
    assert "base.term.TailReward2D.cvar_right_0.1" in run.metrics
    assert sum(line.startswith("term ") for line in format_table(summary).splitlines()) == 2
