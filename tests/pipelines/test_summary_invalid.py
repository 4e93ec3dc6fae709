"""The failed-sample record of a run (`pipelines.summary.invalid_record`), its MLflow metrics and table line."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.config import load_config
from pipelines.summary import flatten_invalid, format_table, invalid_record
from tfft.tail import cvar
from tfft.target import summarize


def _banks():
    rng = np.random.default_rng(0)
    r = rng.normal(size=2000)
    base_valid = r > -1.5  # the failures sit in the lower tail
    final_valid = np.ones(2000, dtype=bool)
    return {"base": (np.where(base_valid, r, np.nan), base_valid), "finetuned": (r + 0.5, final_valid)}


@pytest.mark.parametrize("value", [None, -4.0])
def test_record_states_the_rule_fractions_and_both_left_tails(value):
    banks = _banks()
    record = invalid_record(value, banks)
    r, valid = banks["base"]
    assert record["rule"] == ("exclude" if value is None else "assign") and record["value"] == value
    assert record["invalid_fraction"] == {"base": pytest.approx((~valid).mean()), "finetuned": 0.0}
    assert set(record["left_tail_both_ways"]) == {"base"}  # nothing failed in the fine-tuned bank
    ways = record["left_tail_both_ways"]["base"]
    used = float(r[valid].min()) if value is None else value
    assert ways["value_used"] == used
    assert ways["excluded"]["0.1"] == pytest.approx(cvar(r[valid], side="left", alpha=0.1))
    assert ways["assigned"]["0.1"] == pytest.approx(cvar(np.where(valid, r, used), side="left", alpha=0.1))
    metrics = flatten_invalid(record)
    assert metrics["invalid.assigned"] == float(value is not None)
    assert ("invalid.value" in metrics) == (value is not None)
    assert metrics["base.cvar_left_0.1_assigned"] == ways["assigned"]["0.1"]
    summary = {"base": summarize(r, valid=valid).to_dict(), "invalid": record}
    line = [s for s in format_table(summary).splitlines() if s.startswith("failed samples")]
    assert len(line) == 1 and ("excluded from every statistic" if value is None else "counted at reward -4") in line[0]


def test_invalid_reward_reads_from_yaml_and_overrides():
    assert load_config(None, []).objective.invalid_reward is None
    assert load_config(None, ["objective.invalid_reward=-10"]).objective.invalid_reward == -10.0
