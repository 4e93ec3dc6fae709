"""The guard's last check on the evaluation (`pipelines.eval_guard`)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from pipelines.bankio import Bank, read_bank, write_atomic
from pipelines.config import load_config
from pipelines.eval_guard import apply_evaluation_check, check_evaluation
from tfft.objective import Tilt

# the statistic itself and its standard error: tests/tfft/test_objective.py
RIGHT = Tilt(1.0, "right", 0.1, 1.0)
LEFT = Tilt(-1.0, "left", 0.1, 1.0)


def test_check_evaluation_with_a_margin_flags_only_a_clear_loss() -> None:
    rng = np.random.default_rng(1)
    base, ok = rng.normal(size=2000), np.ones(2000, dtype=bool)
    same = check_evaluation(base, ok, rng.normal(size=2000), ok, RIGHT, margin=2.0)
    assert not same.worse and same.statistic == "right-CVaR(0.1)" and same.margin == 2.0
    worse = check_evaluation(base, ok, rng.normal(size=2000) - 0.5, ok, RIGHT)
    assert worse.worse and worse.finetuned < worse.base
    better_left = check_evaluation(base, ok, rng.normal(size=2000) * 0.5, ok, LEFT)
    assert not better_left.worse and better_left.finetuned > better_left.base
    # validity: a model whose samples mostly fail is worse whatever its few valid samples score
    empty = check_evaluation(base, ok, np.full(2000, np.nan), np.zeros(2000, dtype=bool), RIGHT)
    assert empty.worse and empty.validity_worse and math.isnan(empty.finetuned) and empty.finetuned_validity == 0.0
    fails = np.arange(2000) % 5 != 0  # 80% valid, and the valid ones better than the base
    lost = check_evaluation(base, ok, rng.normal(size=2000) + 1.0, fails, RIGHT, validity_drop=0.05)
    assert lost.worse and lost.validity_worse and lost.finetuned > lost.base and "valid samples 80.0%" in lost.describe()
    slight = np.arange(2000) % 50 != 0  # 98% valid: within the allowed drop
    kept = check_evaluation(base, ok, rng.normal(size=2000) + 1.0, slight, RIGHT, validity_drop=0.05)
    assert not kept.worse and kept.finetuned_validity == pytest.approx(0.98)


def test_without_a_margin_any_measured_loss_is_worse() -> None:
    """The default margin 0: a statistic below the base's at all rejects; at or above it passes. The margin
    scales with the standard error of the difference: the same small loss passes at 2 standard errors."""
    rng = np.random.default_rng(4)
    base, ok = rng.normal(size=4000), np.ones(4000, dtype=bool)
    stat, se = RIGHT.statistic(base, ok)
    slightly = base - 0.2 * se  # the same samples, every reward lower by a fifth of the statistic's error
    lower = check_evaluation(base, ok, slightly, ok, RIGHT)
    assert lower.worse and not lower.validity_worse and lower.finetuned == pytest.approx(stat - 0.2 * se)
    assert not check_evaluation(base, ok, slightly, ok, RIGHT, margin=2.0).worse
    assert not check_evaluation(base, ok, base.copy(), ok, RIGHT).worse  # equal is not below
    with pytest.raises(ValueError, match="margin"):
        check_evaluation(base, ok, base, ok, RIGHT, margin=-1.0)


def _bank(rewards: np.ndarray, shift: float) -> Bank:
    n = len(rewards)
    return Bank(np.arange(n), np.full((n, 2), shift), rewards, np.ones(n, dtype=bool), np.full(n, "", dtype=object),
                np.zeros(n), np.ones(n, dtype=int), np.zeros(n, dtype=bool))


def test_a_worse_model_is_set_aside_and_the_base_kept(tmp_path) -> None:
    cfg = load_config(None, ["eval.size=300"])
    base_state = {"w": torch.zeros(2)}
    tuned_state = {"w": torch.ones(2)}
    (tmp_path / "checkpoint").mkdir()
    torch.save({"state_dict": tuned_state, "guard": {"kept": "last", "reason": "r"}}, tmp_path / "checkpoint" / "model.pt")
    rng = np.random.default_rng(2)
    base_bank = _bank(rng.normal(size=1000), 0.0)
    final_bank = _bank(rng.normal(size=300) - 1.0, 1.0)  # clearly worse on the right tail
    write_atomic(final_bank, tmp_path / "bank_final.parquet")
    kept = apply_evaluation_check(cfg, tmp_path, base_state, base_bank, final_bank, RIGHT, log=lambda line: None)
    assert kept is base_bank  # the base bank itself: the kept model's statistics are the base's
    assert float(read_bank(tmp_path / "bank_final.parquet").x.max()) == 0.0
    assert float(read_bank(tmp_path / "bank_rejected.parquet").x.min()) == 1.0
    blob = torch.load(tmp_path / "checkpoint" / "model.pt", weights_only=True)
    assert torch.equal(blob["state_dict"]["w"], base_state["w"])
    assert blob["guard"]["kept"] == "base" and blob["guard"]["evaluation"]["worse"]
    rejected = torch.load(tmp_path / "checkpoint" / "model_rejected.pt", weights_only=True)
    assert torch.equal(rejected["state_dict"]["w"], tuned_state["w"])
    # A rerun finds the decision made: nothing moves again.
    again = apply_evaluation_check(cfg, tmp_path, base_state, base_bank, kept, RIGHT, log=lambda line: None)
    assert len(again) == 1000 and (tmp_path / "bank_rejected.parquet").is_file()


def test_a_model_that_holds_is_kept_and_the_check_recorded(tmp_path) -> None:
    cfg = load_config(None, [])
    (tmp_path / "checkpoint").mkdir()
    torch.save({"state_dict": {"w": torch.ones(2)}, "guard": {"kept": "last"}}, tmp_path / "checkpoint" / "model.pt")
    rng = np.random.default_rng(3)
    base_bank, final_bank = _bank(rng.normal(size=1000), 0.0), _bank(rng.normal(size=500) + 0.5, 1.0)
    kept = apply_evaluation_check(cfg, tmp_path, {"w": torch.zeros(2)}, base_bank, final_bank, RIGHT, log=lambda line: None)
    assert kept is final_bank and not (tmp_path / "checkpoint" / "model_rejected.pt").exists()
    blob = torch.load(tmp_path / "checkpoint" / "model.pt", weights_only=True)
    assert blob["guard"]["kept"] == "last" and not blob["guard"]["evaluation"]["worse"]
    assert blob["guard"]["evaluation"]["finetuned"] > blob["guard"]["evaluation"]["base"]


def test_a_rejected_lora_run_sets_its_adapter_aside(tmp_path) -> None:
    """With finetune.lora the adapter files describe the rejected model: they leave checkpoint/ with it."""
    cfg = load_config(None, ["eval.size=300"])
    ckpt = tmp_path / "checkpoint"
    ckpt.mkdir()
    torch.save({"state_dict": {"w": torch.ones(2)}, "guard": {}}, ckpt / "model.pt")
    names = ("adapter_model.safetensors", "adapter_config.json", "merged.safetensors")
    for name in names:
        (ckpt / name).write_text(name)
    rng = np.random.default_rng(3)
    base_bank, final_bank = _bank(rng.normal(size=1000), 0.0), _bank(rng.normal(size=300) - 1.0, 1.0)
    write_atomic(final_bank, tmp_path / "bank_final.parquet")
    apply_evaluation_check(cfg, tmp_path, {"w": torch.zeros(2)}, base_bank, final_bank, RIGHT, log=lambda line: None)
    assert not any((ckpt / name).exists() for name in names)
    assert all((ckpt / "rejected" / name).read_text() == name for name in names)


def test_with_conditions_the_statistic_is_the_mean_over_conditions() -> None:
    """With one threshold per condition the objective is (1/C) sum_c CVaR_c: a model that lifts condition 0's
    tail by 1 and lowers condition 1's by 0.1 is better on it, though the pooled CVaR (made of condition 1's
    rows) fell; one that lowers condition 0's by 0.5 and lifts condition 1's by 0.1 is worse."""
    rng = np.random.default_rng(5)
    base_c, final_c = np.repeat([0, 1], 2000), np.repeat([0, 1], 1000)
    base = np.where(base_c == 0, 0.0, 10.0) + rng.normal(size=4000)
    fresh = np.where(final_c == 0, 0.0, 10.0) + rng.normal(size=2000)
    ok_b, ok_f = np.ones(4000, dtype=bool), np.ones(2000, dtype=bool)
    tilt = Tilt((1.3, 11.3), "right", 0.1, 1.0)
    better = fresh + np.where(final_c == 0, 1.0, -0.1)
    check = check_evaluation(base, ok_b, better, ok_f, tilt, base_cond=base_c, final_cond=final_c)
    per_base = [RIGHT.statistic(base[base_c == c], ok_b[base_c == c]) for c in (0, 1)]
    per_final = [RIGHT.statistic(better[final_c == c], ok_f[final_c == c]) for c in (0, 1)]
    assert check.base == pytest.approx(np.mean([v for v, _ in per_base]))
    assert check.finetuned == pytest.approx(np.mean([v for v, _ in per_final]))
    assert check.base_se == pytest.approx(math.hypot(*[e for _, e in per_base]) / 2)
    assert check.finetuned_per_condition == pytest.approx(tuple(v for v, _ in per_final))
    assert not check.worse and "mean over 2 conditions" in check.describe()
    assert check_evaluation(base, ok_b, better, ok_f, RIGHT).worse  # pooled, the same samples read worse
    worse = fresh + np.where(final_c == 0, -0.5, 0.1)
    assert check_evaluation(base, ok_b, worse, ok_f, tilt, base_cond=base_c, final_cond=final_c).worse
    # one pooled threshold (objective.per_condition: false): the pooled statistic, no per-condition values
    pooled = check_evaluation(base, ok_b, better, ok_f, Tilt(10.5, "right", 0.1, 1.0), base_cond=base_c,
                              final_cond=final_c)
    assert pooled.worse and pooled.base_per_condition == ()
    with pytest.raises(ValueError, match="base_cond and final_cond"):
        check_evaluation(base, ok_b, better, ok_f, tilt, base_cond=base_c)


def test_after_refinement_the_refined_model_is_judged(tmp_path) -> None:
    """model_dir: refinement's last round holds the final model; its checkpoint records the decision and is the
    one set aside, while the run's banks stay in out."""
    cfg = load_config(None, ["eval.size=300"])
    first, last = tmp_path / "checkpoint", tmp_path / "refine" / "round-2" / "checkpoint"
    for directory, value in ((first, 1.0), (last, 2.0)):
        directory.mkdir(parents=True)
        torch.save({"state_dict": {"w": torch.full((2,), value)}, "guard": {}}, directory / "model.pt")
    rng = np.random.default_rng(6)
    base_bank, final_bank = _bank(rng.normal(size=1000), 0.0), _bank(rng.normal(size=300) - 1.0, 1.0)
    write_atomic(final_bank, tmp_path / "bank_final.parquet")
    kept = apply_evaluation_check(cfg, tmp_path, {"w": torch.zeros(2)}, base_bank, final_bank, RIGHT,
                                  log=lambda line: None, model_dir=last.parent)
    assert kept is base_bank and (tmp_path / "bank_rejected.parquet").is_file()
    assert float(torch.load(last / "model_rejected.pt", weights_only=True)["state_dict"]["w"][0]) == 2.0
    assert float(torch.load(last / "model.pt", weights_only=True)["state_dict"]["w"][0]) == 0.0
    untouched = torch.load(first / "model.pt", weights_only=True)
    assert float(untouched["state_dict"]["w"][0]) == 1.0 and "evaluation" not in untouched["guard"]


def _screened_bank(rewards: np.ndarray, shift: float, cut: float) -> Bank:
    """A screened bank (working view) whose rows below ``cut`` were skipped, except an audit of every 10th row."""
    n = len(rewards)
    audited = np.arange(n) % 10 == 0
    evaluated = audited | (rewards > cut)
    filled = np.where(evaluated, rewards, rewards[evaluated].min())
    bank = _bank(filled, shift)
    record = {"full": False, "eta": cut, "expensive_calls": int(evaluated.sum()), "certified": {"side": "right"}}
    return Bank(**{**bank.__dict__, "screen": rewards, "evaluated": evaluated, "audited": audited,
                   "screening": record})


def test_a_screened_run_is_checked_and_its_bank_files_set_aside(tmp_path) -> None:
    """Screened banks: the base's cut covers its 10% tail (certified tail), the fine-tuned bank's cut does not
    (audit). A clearly worse model is rejected; every bank_final* file (the bank, its screen bank, its record,
    its journal) becomes bank_rejected*, and the base bank with its record becomes the final bank."""
    cfg = load_config(None, ["eval.size=3000"])
    (tmp_path / "checkpoint").mkdir()
    torch.save({"state_dict": {"w": torch.ones(2)}, "guard": {}}, tmp_path / "checkpoint" / "model.pt")
    rng = np.random.default_rng(7)
    base_r, final_r = rng.normal(size=6000), rng.normal(size=3000) - 1.0
    base_bank = _screened_bank(base_r, 0.0, float(np.quantile(base_r, 0.8)))
    final_bank = _screened_bank(final_r, 1.0, float(np.quantile(final_r, 0.95)))
    write_atomic(final_bank, tmp_path / "bank_final.parquet")
    for name in ("bank_final.screen.json", "bank_final.screen.parquet"):
        (tmp_path / name).write_text(name)
    (tmp_path / "bank_final.evaluated").mkdir()
    kept = apply_evaluation_check(cfg, tmp_path, {"w": torch.zeros(2)}, base_bank, final_bank, RIGHT,
                                  log=lambda line: None)
    check = torch.load(tmp_path / "checkpoint" / "model.pt", weights_only=True)["guard"]["evaluation"]
    assert kept is base_bank and check["worse"] and check["rows"] == "base: certified tail; fine-tuned: audit"
    assert check["base"] == pytest.approx(RIGHT.statistic(base_r)[0])  # exact: the tail was all scored
    audit = final_bank.audited
    assert check["finetuned"] == pytest.approx(RIGHT.statistic(final_r[audit])[0])
    assert (tmp_path / "bank_rejected.evaluated").is_dir()
    assert (tmp_path / "bank_rejected.screen.parquet").read_text() == "bank_rejected.screen.parquet".replace(
        "rejected", "final")
    assert float(read_bank(tmp_path / "bank_rejected.parquet").x.min()) == 1.0
    assert read_bank(tmp_path / "bank_final.parquet").screened
    assert json.loads((tmp_path / "bank_final.screen.json").read_text())["eta"] == base_bank.screening["eta"]
