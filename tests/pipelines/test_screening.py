"""Screened banks (`pipelines.screening`, `pipelines.screen_stats`): the Gaussian closed-form task with a noisy and
an unrelated screen, resumption, failures, config errors (no Ray), and one small end-to-end run through Ray."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.bankio import Bank, read_bank
from pipelines.config import ConfigError, load_config
from pipelines.schema import ScreenConfig
from pipelines.screen_stats import audit_statistics, check_rows, covered
from pipelines.screening import Journal, evaluate_screened, working_view
from rewards.gaussian import noisy_identity, unrelated_score
from tfft.objective import Tilt
from tfft.tail import solve_threshold
from tfft.interval import target_interval
from tfft.target import summarize, target_summary

ROOT = Path(__file__).parents[2]
ALPHA, GAMMA = 0.1, 30.0  # alpha * gamma = 3: a tail of about a tenth of N(0, 1) (the weak tilt of tests/tfft)


def _plain(ids: np.ndarray, x: np.ndarray, reward: np.ndarray, valid: np.ndarray | None = None) -> Bank:
    n = len(ids)
    valid = np.isfinite(reward) if valid is None else valid
    return Bank(ids=ids, x=x, reward=np.where(valid, reward, np.nan), valid=valid,
                error=np.where(valid, "", "nan").astype(object), seconds=np.zeros(n),
                attempts=np.ones(n, dtype=np.int64), cached=np.zeros(n, dtype=bool))


def _screens(n: int, screen, seed: int = 0) -> Bank:
    x = np.random.default_rng(seed).standard_normal((n, 1))
    return _plain(np.arange(n), x, screen(torch.as_tensor(x)).numpy().astype(np.float64))


class CountingPool:
    """The expensive reward r(x) = x (optionally NaN where ``fail``); counts the samples it is sent, and raises
    once ``stop_after`` calls were made (a killed run)."""

    def __init__(self, fail=None, stop_after: int | None = None):
        self.samples, self.calls, self.fail, self.stop_after = 0, 0, fail, stop_after

    def __call__(self, ids: np.ndarray, x: np.ndarray) -> Bank:
        if self.stop_after is not None and self.calls >= self.stop_after:
            raise KeyboardInterrupt("killed")
        self.calls += 1
        self.samples += len(ids)
        r = x[:, 0].copy()
        if self.fail is not None:
            r[self.fail(x)] = np.nan
        return _plain(ids, x, r)


def _screened(tmp_path, screens, pool, side="right", invalid_reward=None, settings=None):
    return evaluate_screened(screens, pool, Journal(tmp_path / "journal"), settings=settings or ScreenConfig(),
                             side=side, alpha=ALPHA, kl_weight=GAMMA, invalid_reward=invalid_reward, seed=3)


@pytest.mark.parametrize("side", ["right", "left"])
def test_a_noisy_screen_gives_full_evaluation_statistics_with_3x_fewer_calls(tmp_path, side):
    n = 8000
    screens, pool = _screens(n, noisy_identity), CountingPool()
    bank, result = _screened(tmp_path, screens, pool, side=side)
    assert not result.full and pool.samples == result.expensive_calls == int(bank.evaluated.sum()) <= n / 3
    assert bank.audited.sum() == 800 and (bank.evaluated >= bank.audited).all()
    assert bank.n_valid == n and bank.accounting()["unevaluated"] == n - result.expensive_calls  # skipped != failed
    np.testing.assert_array_equal(bank.screen, screens.reward)
    r = screens.x[:, 0]  # full evaluation of the same bank
    view = working_view(bank, side).reward
    full, got = (solve_threshold(v, side=side, alpha=ALPHA, kl_weight=GAMMA) for v in (r, view))
    boot = target_interval(r, eta=full.eta, side=side, alpha=ALPHA, kl_weight=GAMMA, seed=0).to_dict()
    key = f"cvar_{side}"
    want = target_summary(r, eta=full.eta, side=side, alpha=ALPHA, kl_weight=GAMMA).to_dict()[key]
    have = target_summary(view, eta=got.eta, side=side, alpha=ALPHA, kl_weight=GAMMA).to_dict()[key]
    for level in ("0.05", "0.1"):  # the target's tail statistics: inside full evaluation's bootstrap interval
        assert boot["lo"][key][level] <= have[level] <= boot["hi"][key][level], (level, have, want)
        assert have[level] == pytest.approx(want[level], abs=0.02)
    spread = np.std([solve_threshold(r[np.random.default_rng(k).integers(0, n, n)], side=side, alpha=ALPHA,
                                     kl_weight=GAMMA).eta for k in range(20)])
    assert abs(got.eta - full.eta) <= 2 * spread


def test_an_unrelated_screen_is_caught_by_the_audit_and_the_bank_is_evaluated_in_full(tmp_path):
    n = 3000
    pool = CountingPool()
    bank, result = _screened(tmp_path, _screens(n, unrelated_score), pool)
    assert result.full and result.expensive_calls == n == pool.samples and bank.evaluated.all()


def test_a_killed_screened_evaluation_resumes_without_calling_the_reward_again(tmp_path):
    n = 4000
    screens = _screens(n, noisy_identity)
    killed = CountingPool(stop_after=3)
    with pytest.raises(KeyboardInterrupt):
        _screened(tmp_path, screens, killed)
    rerun = CountingPool()
    bank, result = _screened(tmp_path, screens, rerun)
    assert killed.samples > 0 and killed.samples + rerun.samples == result.expensive_calls
    again = CountingPool()
    bank2, _ = _screened(tmp_path, screens, again)  # everything already in the journal
    assert again.samples == 0 and np.array_equal(bank2.evaluated, bank.evaluated)


def test_failed_expensive_calls_stay_failures_and_skipped_samples_do_not(tmp_path):
    n = 8000
    pool = CountingPool(fail=lambda x: np.abs(x[:, 0] - 0.5) < 0.05)  # a band in the middle: about 4%
    bank, result = _screened(tmp_path, _screens(n, noisy_identity), pool)
    failed = bank.evaluated & ~bank.valid
    assert failed.sum() > 0 and set(bank.error[failed]) == {"nan"}
    assert bank.accounting()["invalid"] == failed.sum() and not result.full
    view = working_view(bank, "right")
    assert np.isnan(view.reward[failed]).all() and np.isfinite(view.reward[~failed]).all()


def test_audit_statistics_keep_the_certified_tail_and_take_the_rest_from_the_audit(tmp_path):
    n = 8000
    screens = _screens(n, noisy_identity)
    bank, result = _screened(tmp_path, screens, CountingPool())
    bank = working_view(Bank(**{**bank.__dict__, "screening": {
        **result.record(), "audited": int(bank.audited.sum()), "certified": {"side": "right"}}}), "right")
    eta = solve_threshold(bank.reward, side="right", alpha=ALPHA, kl_weight=GAMMA).eta
    tilt = {"eta": eta, "side": "right", "alpha": ALPHA, "kl_weight": GAMMA}
    valid = np.ones(n, dtype=bool)
    stats = {"base": summarize(bank.reward).to_dict(), "finetuned": summarize(bank.reward).to_dict(),
             "target": target_summary(bank.reward, **tilt).to_dict()}
    interval = target_interval(bank.reward, seed=0, **tilt).to_dict()
    extra = audit_statistics({"base": (bank, bank.reward, valid), "finetuned": (bank, bank.reward, valid)}, stats,
                             interval, tilt=Tilt.from_dict(tilt), tolerance=0.05)
    skipped = set(extra["screened_from_audit"])
    assert {"target.mean", "target.cvar_left.0.1", "base.mean", "base.cvar_left.0.2"} <= skipped
    assert "target.cvar_right.0.05" not in skipped and "target.cvar_right.0.1" not in skipped
    r = screens.x[:, 0]
    assert stats["target"]["cvar_right"]["0.1"] == pytest.approx(
        target_summary(r, **tilt).to_dict()["cvar_right"]["0.1"], abs=0.02)
    lo, hi = extra["audit_interval"]["base"]["lo"]["mean"], extra["audit_interval"]["base"]["hi"]["mean"]
    assert lo <= stats["base"]["mean"] <= hi and lo - 0.05 <= r.mean() <= hi + 0.05
    assert extra["screen"]["expensive_calls"] == result.expensive_calls and extra["screen"]["audited"] == 800
    assert covered(r, np.ones(n), side="right", level=0.05, cut=np.quantile(r, 0.9), tolerance=0.05)


def test_the_evaluation_check_reads_the_certified_tail_where_it_covers_the_objective_else_the_audit(tmp_path):
    """`pipelines.screen_stats.check_rows`: at alpha 0.05 the certified tail holds the objective's whole tail, and
    the statistic of the working view is the full evaluation's to within its standard error; at alpha 0.5 it does
    not, and the audit (800 rows) gives the statistic. The valid fraction always comes from the audit."""
    n = 8000
    screens = _screens(n, noisy_identity)
    bank, result = _screened(tmp_path, screens, CountingPool())
    bank = working_view(Bank(**{**bank.__dict__, "screening": {**result.record(), "certified": {"side": "right"}}}),
                        "right")
    reward, valid = bank.scored(None)
    r = screens.x[:, 0]
    for alpha, source in ((0.05, "certified tail"), (0.5, "audit")):
        stat_rows, valid_rows, got = check_rows(bank, reward, valid, side="right", alpha=alpha, tolerance=0.05)
        assert got == source and len(valid_rows[0]) == 800 == int(bank.audited.sum())
        tilt = Tilt(0.0, "right", alpha, 1.0)
        value, se = tilt.statistic(*stat_rows)
        assert len(stat_rows[0]) == (n if source == "certified tail" else 800)
        assert abs(value - tilt.statistic(r)[0]) < 3 * se
    plain = _plain(np.arange(n), screens.x, r)
    assert check_rows(plain, r, np.ones(n, dtype=bool), side="right", alpha=0.5, tolerance=0.05)[2] == "all"


@pytest.mark.parametrize("override, key", [
    ("reward.screen.audit=0", "reward.screen.audit"),
    ("reward.screen.audit=1.5", "reward.screen.audit"),
    ("reward.screen.tolerance=0", "reward.screen.tolerance"),
    ("reward.screen.tolerance=1", "reward.screen.tolerance"),
    ("reward.screen.confidence=0.3", "reward.screen.confidence"),
    ("reward.screen.min_audit=0", "reward.screen.min_audit"),
    ("reward.screen.target=nowhere:screen", "reward.screen.target"),
])
def test_bad_screen_settings_name_the_key(override, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config(None, ["reward.screen.target=rewards.toy2d:TailReward2D", override])


def test_screening_the_mean_is_refused_before_any_work():
    with pytest.raises(ConfigError, match="'reward.screen.target'.*objective.kind is 'mean'"):
        load_config(None, ["reward.screen.target=rewards.toy2d:TailReward2D", "objective.kind=mean"])
    with pytest.raises(ConfigError, match="'reward.screen.target'.*alpha is 1"):
        load_config(None, ["reward.screen.target=rewards.toy2d:TailReward2D", "objective.alpha=1"])


@pytest.fixture(scope="module")
def screened_run(tmp_path_factory, pretrain_cache, local_ray):
    """One small run of the Gaussian task through Ray (the session's shared one) with the noisy screen; returns
    (out, summary, stdout)."""
    import io
    from contextlib import redirect_stdout

    from pipelines.run import run_pipeline

    root = tmp_path_factory.mktemp("screened")
    overrides = [
        "threshold.refine_rounds=0", f"objective.kl_weight={GAMMA}", "bank.size=12000", "bank.shard_size=6000",
        "eval.size=4000", "pretrain.steps=300", "pretrain.n_samples=5000", "sampler.steps=10",
        "finetune.solver=weighted", "finetune.steps=10", "finetune.num_workers=1", "finetune.backend=local", "finetune.batch_size=64",
        "finetune.log_every=5", "reward.screen.target=rewards.gaussian:noisy_identity",
        f"pretrain.cache_dir={pretrain_cache}", f"tracking.uri=sqlite:///{root / 'mlflow.db'}",
        f"bank.cache_dir={root / 'rewards'}",
    ]
    cfg = load_config(ROOT / "tune_configs/gaussian_refine.yaml", overrides)
    text = io.StringIO()
    with redirect_stdout(text):
        summary = run_pipeline(cfg, root / "run")
        again = run_pipeline(cfg, root / "run")  # a rerun reuses both screened banks
    return root / "run", summary, again, text.getvalue(), f"sqlite:///{root / 'mlflow.db'}"


def _assert_table_stars_the_audited_cells(summary: dict) -> None:
    """The printed table marks exactly the cells named in ``screened_from_audit`` (the audit's estimates)."""
    from pipelines.summary import format_table

    from_audit = set(summary["screened_from_audit"])
    starred = set()
    for line in format_table(summary).splitlines():
        name, *cells = line.split() or [""]
        if name != "mean" and "-CVaR(" not in name:
            continue
        entry = "mean" if name == "mean" else "cvar_{}.{}".format(*name.rstrip(")").split("-CVaR("))
        starred |= {f"{col}.{entry}" for col, cell in zip(("base", "finetuned", "target"), cells) if cell.endswith("*")}
    assert starred == from_audit and starred


@pytest.mark.ray
@pytest.mark.slow
def test_a_screened_run_records_its_accounting_and_matches_full_evaluation(screened_run):
    out, summary, again, text, uri = screened_run
    screen = summary["screen"]
    n = 12000
    print(text)
    assert {"expensive_calls", "skipped", "audited", "miss_rate", "miss_rate_upper", "base", "finetuned"} <= set(screen)
    assert screen["expensive_calls"] == screen["base"]["expensive_calls"] <= n / 3 and screen["audited"] == 1200
    assert screen["skipped"] == n - screen["expensive_calls"] and screen["miss_rate_upper"] <= 0.05
    base = read_bank(out / "bank_base.parquet")
    assert base.screened and int(base.evaluated.sum()) == screen["expensive_calls"] and base.audited.sum() == 1200
    assert np.isnan(base.reward[~base.evaluated]).all() and base.valid.all() and summary["failures"]["base"]["invalid"] == 0
    final = read_bank(out / "bank_final.parquet")
    assert final.screened and int(final.evaluated.sum()) == screen["finetuned"]["expensive_calls"]
    # full evaluation of the same bank (r = x): the threshold and the target's right tail agree
    r = base.x[:, 0]
    full = solve_threshold(r, side="right", alpha=ALPHA, kl_weight=GAMMA)
    boot = target_interval(r, eta=full.eta, side="right", alpha=ALPHA, kl_weight=GAMMA, seed=0).to_dict()
    assert summary["threshold"]["eta"] == pytest.approx(full.eta, abs=0.05)
    assert boot["lo"]["cvar_right"]["0.1"] <= summary["target"]["cvar_right"]["0.1"] <= boot["hi"]["cvar_right"]["0.1"]
    assert "base.mean" in summary["screened_from_audit"] and "target.cvar_right.0.1" not in summary["screened_from_audit"]
    assert abs(summary["base"]["mean"] - r.mean()) < 0.15
    _assert_table_stars_the_audited_cells(summary)
    # the evaluation check reads what each bank can give: the base bank's cut (certified for the tilted target)
    # leaves part of its untilted 10% tail unscored, so its audit; the evaluation bank's certified tail
    check = summary["guard"]["evaluation"]
    assert check["rows"] == "base: audit; fine-tuned: certified tail" and not check["worse"]
    for column in ("base", "finetuned"):
        assert check[column] == pytest.approx(summary[column]["cvar_right"]["0.1"], abs=0.02), column
    first, rerun = summary["stages"], again["stages"]
    calls = screen["expensive_calls"]
    assert first["bank_base"]["status"] == "built" and (first["bank_base"]["sampled"], first["bank_base"]["shards"]) == (n, 2)
    assert (first["bank_base"]["expensive_new"], first["bank_base"]["expensive_stored"]) == (calls, 0)
    for name in ("bank_base", "bank_final"):  # the rerun reuses both screened banks, calling the reward for nothing
        assert rerun[name]["status"] == "reused" and rerun[name]["expensive_new"] == 0, name
    assert rerun["bank_base"]["expensive_calls"] == calls
    assert again["screen"] == screen and again["threshold"] == summary["threshold"]
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert runs and "screen.base.expensive_calls" in runs[0].data.metrics
    assert "audit_lo.base.mean" in runs[0].data.metrics
