"""``tfft sweep``: the sweep section (fast, no Ray), concurrent MLflow writers, and one real sweep on Ray.

The Ray part runs one 2 x 2 grid (alpha x kl_weight, right side) of the shipped smoke config with its reward
served by Ray Serve (``reward.serve``), fine-tuning in each trial's own process (``finetune.backend: local``, no
worker group to start): it is killed after two trials finish, restarted with the same --out, and then checked
for resumption, MLflow runs, Tune's intermediate results, the expected trends of the report table, and that
each sweep run built the served reward once.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines.cli import main
from pipelines.schema import Config
from pipelines.sweep.scheduler import asha_scheduler
from pipelines.sweep.resources import DRIVER_CPUS, fit_trial, plan_concurrency
from pipelines.sweep.spec import load_sweep
from pipelines.train_session import local_checkpoints

from mlflow_writer import hammer  # tests/pipelines: light to import in a spawned process

ROOT = Path(__file__).parents[2]
SMOKE = ROOT / "tune_configs" / "sweep_toy2d_smoke.yaml"

# The served reward of the real sweep: the 2-D reward, appending its pid to ``log`` each time it is built.
COUNTING = '''
import os
from rewards.toy2d import TailReward2D

class CountingToy(TailReward2D):
    def __init__(self, log, **kwargs):
        super().__init__(**kwargs)
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\\n")
'''
APP = "smoke-served-reward"
# Each trial fine-tunes in its Tune driver's process and forwards its reports to Tune.
LOCAL = ["finetune.backend=local", "finetune.num_workers=1"]


def _served(log: Path) -> list[str]:
    """Overrides that serve the counting reward (one replica of a quarter CPU)."""
    return ["reward.target=counting_reward:CountingToy", f"reward.kwargs.log={log}", "reward.serve.enabled=true",
            f"reward.serve.name={APP}", "reward.serve.num_cpus=0.25"]


GRID = """
objective: {side: right}
sweep:
  parameters:
    objective.alpha: {grid: [0.05, 0.1, 0.2]}
    objective.kl_weight: {grid: [5, 10]}
"""


def _write(tmp_path: Path, text: str, name: str = "sweep.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --- the sweep section --------------------------------------------------------------------------------


def test_grid_expands_into_named_validated_trials(tmp_path):
    sweep = load_sweep(_write(tmp_path, GRID), ["finetune.steps=7"])
    names = [t.name for t in sweep.trials]
    assert len(names) == 6 and len(set(names)) == 6
    assert "alpha=0.05_kl_weight=5" in names and "alpha=0.2_kl_weight=10" in names
    for t in sweep.trials:
        assert isinstance(t.config, Config)
        assert t.config.objective.alpha == t.params["objective.alpha"]
        assert t.config.objective.kl_weight == t.params["objective.kl_weight"]
        assert t.config.finetune.steps == 7 and t.config.objective.side == "right"
        assert t.bank_group == ""  # alpha and kl_weight leave the base bank alone
    assert sweep.base.finetune.steps == 7


def test_random_domains_are_reproducible_and_num_samples_extends(tmp_path):
    text = """
sweep:
  parameters:
    objective: {kl_weight: {loguniform: [1, 100]}, side: {choice: [left, right]}}
    seed: {choice: [0, 1, 2]}
    finetune.lr: {uniform: [0.001, 0.01]}
  num_samples: 3
  seed: 7
"""
    path = _write(tmp_path, text)
    first = load_sweep(path)
    again = load_sweep(path)
    more = load_sweep(path, ["sweep.num_samples=4"])
    assert [t.params for t in first.trials] == [t.params for t in again.trials]
    assert [t.name for t in more.trials[:3]] == [t.name for t in first.trials]
    for t in more.trials:
        assert 1 <= t.config.objective.kl_weight <= 100 and 0.001 <= t.config.finetune.lr <= 0.01
        assert t.config.objective.side in ("left", "right") and t.config.seed in (0, 1, 2)
        assert t.name.endswith(f"sample={more.trials.index(t)}")
        assert t.bank_group == f"seed={t.config.seed}"  # the seed changes the base model and its bank


@pytest.mark.parametrize(
    "text, key",
    [
        ("sweep: {parameters: {objective.alpah: {grid: [0.1]}}}", "objective.alpah"),
        ("sweep: {parameters: {objective.alpha: {grid: [0.1, 1.5]}}}", "objective.alpha"),
        ("sweep: {parameters: {objective.alpha: [0.1, 0.2]}}", "sweep.parameters.objective.alpha"),
        ("sweep: {parameters: {ray.num_cpus: {grid: [1, 2]}}}", "sweep.parameters.ray.num_cpus"),
        ("sweep: {parameters: {seed: {grid: [0]}}, num_sample: 2}", "sweep.num_sample"),
        ("sweep: {parameters: {seed: {grid: [0]}}, scheduler: {metric: loss, mode: up}}", "sweep.scheduler.mode"),
        ("sweep: {parameters: {seed: {grid: [0]}}, scheduler: {metric: cvar}}", "sweep.scheduler.metric"),
        ("sweep: {parameters: {seed: {grid: [0]}}, num_samples: many}", "sweep.num_samples"),
        ("sweep: {parameters: {seed: {grid: [0]}}, seed: -1}", "sweep.seed"),
        ("sweep: {parameters: {seed: {grid: [0]}}, scheduler: {grace_period: 0}}", "sweep.scheduler.grace_period"),
        ("sweep: {parameters: {seed: {grid: [0]}}, scheduler: {kind: hyperband}}", "sweep.scheduler.kind"),
        ("sweep: {parameters: {seed: {grid: [0]}}, scheduler: {rungs: 3}}", "sweep.scheduler.rungs"),
        ("finetune: {stepz: 3}\nsweep: {parameters: {seed: {grid: [0]}}}", "finetune.stepz"),
        ("objective: {side: right}", "sweep"),
    ],
)
def test_config_problems_exit_2_naming_the_key_before_ray_starts(tmp_path, capsys, text, key):
    path = _write(tmp_path, text)
    assert main(["sweep", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"'{key}'" in err, err
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()
    assert not (tmp_path / "out").exists()


def test_concurrency_and_per_trial_resources_follow_the_cluster():
    cfg = Config()  # 2 workers x 1 CPU, pools 1 + 1 CPU
    assert plan_concurrency({"CPU": 2.0}, [cfg]) == 1
    assert plan_concurrency({"CPU": 16.0}, [cfg]) == 7
    assert plan_concurrency({"CPU": 2.0}, [cfg], requested=2) == 2
    one = fit_trial(cfg, 2.0 - DRIVER_CPUS)
    assert one.finetune.cpus_per_worker == 0.995 and cfg.finetune.cpus_per_worker == 1.0
    assert one.bank.sampler.num_cpus + one.bank.reward.num_cpus <= 2.0 - DRIVER_CPUS
    two = fit_trial(cfg, 1.0 - DRIVER_CPUS)
    assert 2 * (2 * two.finetune.cpus_per_worker + DRIVER_CPUS) <= 2.0
    assert 2 * (two.bank.sampler.num_cpus + two.bank.reward.num_cpus + DRIVER_CPUS) <= 2.0
    roomy = fit_trial(cfg, 7.0)
    assert roomy.finetune.cpus_per_worker == 1.0 and roomy.bank.reward.num_cpus == 1.0


def test_asha_counts_training_reports_and_lets_finished_trials_record(tmp_path):
    text = GRID + "  scheduler: {kind: asha, metric: active_fraction, grace_period: 3}\n"
    sweep = load_sweep(_write(tmp_path, text), ["finetune.steps=100", "finetune.log_every=10"])
    scheduler = asha_scheduler(sweep, sweep.trials)
    assert scheduler._metric == "active_fraction" and scheduler._time_attr == "training_iteration"
    assert scheduler._max_t == 10 and scheduler._stop_last_trials is False
    assert asha_scheduler(load_sweep(_write(tmp_path, GRID)), sweep.trials) is None


def test_sweep_section_defaults_come_from_its_schema(tmp_path):
    """A scheduler given by its metric alone gets the schema's defaults; ``sweep.*`` overrides merge over the file."""
    from pipelines.schema_sweep import SchedulerSection, SweepSection

    sweep = load_sweep(_write(tmp_path, GRID + "  scheduler: {metric: loss, mode: min}\n"),
                       ["sweep.scheduler.reduction_factor=3", "sweep.max_concurrent_trials=2"])
    default = SchedulerSection()
    assert (sweep.sweep.scheduler.metric, sweep.sweep.scheduler.mode) == ("loss", "min")
    assert sweep.sweep.scheduler.grace_period == default.grace_period and sweep.sweep.scheduler.reduction_factor == 3
    assert (sweep.sweep.num_samples, sweep.sweep.seed) == (SweepSection().num_samples, SweepSection().seed)
    assert sweep.sweep.max_concurrent_trials == 2


# --- MLflow: concurrent writers on one SQLite store ---------------------------------------------------


@pytest.mark.slow
def test_concurrent_trials_write_one_sqlite_store_without_lock_errors(tmp_path):
    from mlflow.tracking import MlflowClient

    from pipelines.tracking import open_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = open_run(uri, "stress", "parent")
    runs = [open_run(uri, "stress", f"t{i}", parent_run_id=parent.run_id).run_id for i in range(6)]
    artifact = _write(tmp_path, "x", "a.txt")
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=hammer, args=(uri, r, str(artifact))) for r in runs]
    for p in procs:
        p.start()
    for p in procs:
        p.join(600)  # slow under load (each writer imports mlflow and waits on SQLite locks), never stuck
    assert [p.exitcode for p in procs] == [0] * len(procs)
    client = MlflowClient(tracking_uri=uri)
    for run_id in runs:
        assert len(client.get_metric_history(run_id, "loss")) == 40
        assert client.get_run(run_id).info.status == "FINISHED"


# --- one real sweep on Ray ----------------------------------------------------------------------------


def _wait_for(path: Path, word: str, count: int, proc: subprocess.Popen, output: Path, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        lines = path.read_text().splitlines() if path.is_file() else []
        if sum(f" {word} " in f" {line} " for line in lines) >= count:
            return
        assert proc.poll() is None, "the sweep ended before it could be interrupted:\n" + output.read_text()[-3000:]
        time.sleep(1)
    raise AssertionError(f"no {count} '{word}' lines in {path} after {timeout} s")


def _checkpointed(out: Path) -> set[str]:
    """Unfinished trials that hold a complete fine-tuning checkpoint (the local backend renames each into place)."""
    trials = (out / "trials").glob("*") if (out / "trials").is_dir() else []
    return {t.name for t in trials if local_checkpoints(t / "train" / "finetune") and not (t / "summary.json").is_file()}


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory, pretrain_cache, local_ray):
    """The smoke grid, killed (SIGKILL to its process group, its own Ray with it) once two trials have finished
    and another holds a fine-tuning checkpoint, then run again with the same --out on the session's shared Ray
    (``local_ray``, conftest.py).

    Its reward is served (``reward.serve``): the 2-D reward, counting its constructions in a file, held by one
    Ray Serve replica that every trial's reward actors and fine-tuning loop call."""
    root = tmp_path_factory.mktemp("sweep")
    out = root / "grid"
    (local_ray / "counting_reward.py").write_text(COUNTING)
    constructions = root / "constructions.log"
    args = [str(SMOKE), "--out", str(out), f"pretrain.cache_dir={pretrain_cache}", f"bank.cache_dir={root / 'rewards'}",
            f"tracking.uri=sqlite:///{root / 'mlflow.db'}", "ray.num_cpus=2", *LOCAL, *_served(constructions)]
    started = time.time()
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)  # the user modules too
    env = {**os.environ, "PYTHONPATH": path}
    output = root / "interrupted_sweep.log"
    with open(output, "w") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "sweep", *args], cwd=root, env=env,
                                stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for(out / "trials.log", "finished", 2, proc, output, timeout=900)
        deadline = time.time() + 300
        while not _checkpointed(out) and time.time() < deadline and proc.poll() is None:
            time.sleep(1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    killed_after = time.time() - started
    done_before = {p.parent.name: p.stat().st_mtime for p in (out / "trials").glob("*/summary.json")}
    interrupted = _checkpointed(out)
    built_before = len(constructions.read_text().splitlines())
    restart = io.StringIO()
    with contextlib.redirect_stdout(restart):
        assert main(["sweep", *args]) == 0
    return {"out": out, "root": root, "done_before": done_before, "interrupted": interrupted,
            "seconds": time.time() - started, "killed_after": killed_after, "first_log": output.read_text(),
            "restart_log": restart.getvalue(), "built_before": built_before,
            "built": len(constructions.read_text().splitlines())}


def _log_lines(out: Path) -> list[list[str]]:
    return [line.split()[1:3] for line in (out / "trials.log").read_text().splitlines()]


@pytest.mark.ray
@pytest.mark.slow
def test_restarted_sweep_runs_only_the_unfinished_trials(sweep_dir):
    out, done_before = sweep_dir["out"], sweep_dir["done_before"]
    print(f"sweep: killed after {sweep_dir['killed_after']:.0f} s, all done after {sweep_dir['seconds']:.0f} s")
    assert len(done_before) >= 2
    for name, mtime in done_before.items():
        assert (out / "trials" / name / "summary.json").stat().st_mtime == mtime
    lines = _log_lines(out)
    for name in done_before:  # skipped on the restart, started only once
        assert ["skipped", name] in lines and lines.count(["started", name]) == 1
    names = [t["name"] for t in json.loads((out / "sweep.json").read_text())["trials"]]
    assert len(names) == 4
    for name in set(names) - set(done_before):
        assert lines.count(["finished", name]) == 1
        assert (out / "trials" / name / "summary.json").is_file()
    # Tune saw the fine-tuning reports of the trials it ran (TuneReportCallback), not only the end
    for name in set(names) - set(done_before):
        results = (out / "tune" / "tune" / name / "result.json").read_text().splitlines()
        assert len(results) >= 3 and "active_fraction" in json.loads(results[-1])
    # a trial killed mid-way resumed from its fine-tuning checkpoint (step >= 100): its loop logged the loss of
    # step 25 to MLflow once, before the kill, and the restart went on from the checkpoint
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{sweep_dir['root'] / 'mlflow.db'}")
    runs = json.loads((out / "sweep.json").read_text())["runs"]
    assert sweep_dir["interrupted"], "the sweep was not killed during a fine-tuning run"
    for name in sweep_dir["interrupted"]:
        assert lines.count(["started", name]) == 2
        steps = sorted(m.step for m in client.get_metric_history(runs[name], "loss"))
        assert steps.count(25) == 1 and steps[-1] == 300, steps


@pytest.mark.ray
@pytest.mark.slow
def test_mlflow_holds_one_parent_and_a_nested_run_per_trial_with_step_metrics(sweep_dir):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{sweep_dir['root'] / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tfft")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(children) == 4 and len(runs) == 5
    for run in children:
        assert run.info.status == "FINISHED"
        assert {"objective.alpha", "objective.kl_weight"} <= set(run.data.params)
        steps = {m.step for m in client.get_metric_history(run.info.run_id, "loss")}
        assert len(steps) >= 3, (run.info.run_name, steps)
        assert "finetuned.cvar_right_0.1" in run.data.metrics
        assert "summary.json" in {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"report.csv", "report.md", "tradeoff.png"} <= {a.path for a in client.list_artifacts(parents[0].info.run_id)}


@pytest.mark.ray
@pytest.mark.slow
def test_report_shows_the_tail_rising_as_kl_weight_falls(sweep_dir):
    with open(sweep_dir["out"] / "report" / "report.csv") as f:
        rows = [r for r in csv.DictReader(f)]
    assert len(rows) == 4 and {r["status"] for r in rows} == {"done"}
    for side in {r["side"] for r in rows}:
        for alpha in {r["alpha"] for r in rows if r["side"] == side}:
            cell = sorted((r for r in rows if r["side"] == side and r["alpha"] == alpha),
                          key=lambda r: float(r["kl_weight"]))
            tails = [float(r[f"finetuned_cvar_{side}"]) for r in cell]
            assert all(a > b for a, b in zip(tails, tails[1:])), (side, alpha, tails)
            for r in cell:
                assert float(r[f"finetuned_cvar_{side}"]) > float(r[f"base_cvar_{side}"]), r


@pytest.mark.ray
@pytest.mark.slow
def test_each_sweep_run_builds_the_served_reward_once(sweep_dir):
    # The killed run built it once (its Ray died with it); the restart started a fresh application, built it
    # once more, let its second trial join it by name and deleted it at the end. No reward actor, training
    # worker or driver built one of its own.
    assert sweep_dir["built_before"] == 1 and sweep_dir["built"] == 2
    first, restart = sweep_dir["first_log"], sweep_dir["restart_log"]
    assert first.count(f"[serve] starting application '{APP}'") == 1
    assert first.count(f"[serve] using the running application '{APP}'") == 3  # four trials, one application
    assert restart.count(f"[serve] starting application '{APP}'") == 1
    assert restart.count(f"[serve] using the running application '{APP}'") == 1
    assert f"[serve] deleted application '{APP}'" in restart
    # the served values are the reward's own
    import numpy as np
    import torch

    from pipelines.bankio import read_bank
    from rewards.toy2d import TailReward2D

    bank = read_bank(next(sweep_dir["out"].rglob("bank_base.parquet")))
    direct = TailReward2D().evaluate(torch.as_tensor(np.array(bank.x))).rewards.numpy()
    np.testing.assert_array_equal(bank.reward, direct)



# A one-trial sweep whose trial fine-tunes in a Ray Train worker group (the default backend), at smoke size; the
# base model is the smoke sweep's (one pretraining for both in the session's cache).
RAY_TRAIN_TRIAL = """
seed: 0
objective: {kind: cvar, side: right, alpha: 0.1}
sampler: {steps: 5}
bank: {size: 500}
eval: {size: 500}
finetune: {steps: 4, batch_size: 64, log_every: 2, checkpoint_every: 2}
sweep:
  parameters:
    objective.kl_weight: {grid: [10]}
"""


@pytest.mark.ray
@pytest.mark.slow
def test_a_ray_train_trial_reports_its_fine_tuning_to_tune(tmp_path, pretrain_cache, local_ray):
    """The smoke sweep above fine-tunes in each trial's own process; this trial (on the session's shared Ray)
    runs Ray Train's two DDP workers, fitted into the trial's CPUs, whose reports reach Tune through
    ``TuneReportCallback``."""
    out = tmp_path / "out"
    args = ["sweep", str(_write(tmp_path, RAY_TRAIN_TRIAL)), "--out", str(out), f"pretrain.cache_dir={pretrain_cache}",
            f"bank.cache_dir={tmp_path / 'rewards'}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    assert main(args) == 0
    trial = out / "trials" / "kl_weight=10"
    summary = json.loads((trial / "summary.json").read_text())
    assert summary["solver"] == "adjoint" and summary["finetuned"]["n"] == 500
    workers = summary["sweep"]["resources"]["cpus_per_worker"]
    assert 0 < workers and 2 * workers + DRIVER_CPUS <= 2.0  # both workers fit beside the trial's driver
    results = [json.loads(line) for line in (out / "tune" / "tune" / trial.name / "result.json").read_text().splitlines()]
    assert [r["step"] for r in results] == [2, 4] and all("active_fraction" in r for r in results)
    # a report with a Ray Train checkpoint: TuneReportCallback names it; the worker group's checkpoints are Train's
    assert all("checkpoint_path" in r for r in results)
    assert (trial / "train" / "finetune" / "checkpoint_manager_snapshot.json").is_file()
