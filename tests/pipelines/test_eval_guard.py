"""The guard's last check on the evaluation (`pipelines.eval_guard`)."""

from __future__ import annotations

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
