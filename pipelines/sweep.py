"""``tfft sweep``: Ray Tune over the tail level, the KL weight or any other key, from one shared base bank.

    sweep config --(pipelines.sweep_spec: validated trials, before Ray starts)--> base model + bank
    (once per bank group) --> Tune: one driver function per trial, each runs threshold -> fine-tune
    (its own TorchTrainer) -> evaluate into DIR/trials/<name>/ --> DIR/report/ (pipelines.report)

Each trial is a Tune function trainable that builds and fits a TorchTrainer (the Train V2 way); the
trainer's reports reach Tune (and the optional ASHA scheduler) through ``TuneReportCallback``. With
``finetune.backend: local`` the trial runs the fine-tuning loop in its own process (no worker group to start)
and forwards each report to Tune itself (``pipelines.train_session.forwarding_reports``). MLflow
holds a parent run for the sweep and a nested run per trial, all created by this driver before Tune
starts; trials only log metrics and artifacts into them, with retries. A trial is done when its
``summary.json`` exists: a restarted sweep skips those trials and resumes the others from their stages
(fine-tuning checkpoints, banks). ``DIR/trials.log`` records what happened to every trial.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path
from typing import Any, Callable

from pipelines.config import ConfigError, to_flat_dict, to_yaml
from pipelines.outdir import claim_output_dir, trial_status
from pipelines.raysession import check_address
from pipelines.run import attach_reward, choose_solver, prepare_base, run_from_bank
from pipelines.serving import detach
from pipelines.schema import Config
from pipelines.sweep_resources import DRIVER_CPUS, fit_trial, plan_concurrency
from pipelines.sweep_spec import Sweep, TrialSpec
from pipelines.sweep_tracking import RetryingRun, open_or_reuse
from pipelines.tracking import resolve_tracking_uri

__all__ = ["run_sweep", "asha_scheduler", "TRAIN_METRICS"]

# What finetune.train_loop reports every log_every steps (the last two with the adjoint solver only).
TRAIN_METRICS = ("loss", "valid_fraction", "invalid_count", "mean_reward", "active_fraction")


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"


def _append_log(out: Path, line: str) -> None:
    with open(out / "trials.log", "a") as f:  # O_APPEND: whole short lines from concurrent trials
        f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {line}\n")


def _trial_main(config: dict[str, Any], *, jobs: dict[str, dict[str, Any]], bases: dict[str, Any]) -> None:
    """The Tune trainable: one trial, from the shared base bank to ``summary.json``."""
    job = jobs[config["trial"]]
    name, out, sweep_dir = job["name"], Path(job["out"]), Path(job["sweep_dir"])
    cfg: Config = job["config"]
    run = RetryingRun(job["uri"], job["run_id"])
    base, base_bank = bases[job["group"]]

    def log(message: str) -> None:
        print(f"[{name}] {message}", flush=True)

    started = time.time()
    _append_log(sweep_dir, f"started {name}")
    run.resume()
    try:
        with _reporting_to_tune(cfg):
            summary = run_from_bank(cfg, out, base, base_bank, run=run, solver=job["solver"], log=log,
                                    finetune_callbacks=_tune_callbacks(cfg))
        summary["wall_seconds"] = time.time() - started
        summary["sweep"] = {"trial": name, "params": job["params"], "resources": job["resources"]}
        # summary.json marks the trial done: it appears only once MLflow holds everything.
        pending = out / ".pending" / "summary.json"
        pending.parent.mkdir(exist_ok=True)
        pending.write_text(json.dumps(summary, indent=2))
        run.log_artifact(pending)
        run.finish()
        pending.replace(out / "summary.json")
    except Exception as exc:  # a stop by the scheduler or an interrupt is not a failure
        _append_log(sweep_dir, f"failed {name}: {_one_line(exc)}")
        run.finish("FAILED")
        raise
    _append_log(sweep_dir, f"finished {name} in {summary['wall_seconds']:.0f}s")


def _tune_callbacks(cfg: Config) -> list[Any]:
    """The fine-tuning callbacks of a trial: Ray Train's reports become this Tune trial's results (what ASHA
    schedules on). None with the local backend: its loop reports from this process (:func:`_reporting_to_tune`)."""
    if cfg.finetune.backend == "local":
        return []
    from ray.tune.integration.ray_train import TuneReportCallback

    return [TuneReportCallback()]


def _reporting_to_tune(cfg: Config) -> Any:
    """A context in which the local backend's reports (in this trial's process) go to ``ray.tune.report``."""
    if cfg.finetune.backend != "local":
        return contextlib.nullcontext()
    from ray import tune

    from pipelines.train_session import forwarding_reports

    return forwarding_reports(tune.report)


def _check_scheduler(sweep: Sweep, solvers: dict[str, str]) -> None:
    sched = sweep.sweep.scheduler
    if sched is None:
        return
    allowed = TRAIN_METRICS if all(s == "adjoint" for s in solvers.values()) else TRAIN_METRICS[:3]
    if sched.metric not in allowed:
        raise ConfigError(f"'sweep.scheduler.metric' must be one of {', '.join(allowed)} (reported during "
                          f"fine-tuning with these trials' solvers), got {sched.metric!r}")


def run_sweep(sweep: Sweep, out: str | Path, *, log: Callable[[str], None] = print) -> dict[str, str]:
    """Run every trial not yet done; write ``out/report/``. Returns ``{trial name: status}`` with status
    done | stopped (ASHA) | failed | not run."""
    out = Path(out).resolve()
    solvers = {t.name: choose_solver(t.config) for t in sweep.trials}  # config problems before Ray starts
    _check_scheduler(sweep, solvers)
    check_address(sweep.base.ray)
    claim_output_dir(out, to_yaml(sweep.base), "a sweep")
    state_path = out / "sweep.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    uri = resolve_tracking_uri(sweep.base.tracking.uri)
    if state.get("tracking_uri") != uri:
        state = {}  # another store: new runs there
    todo = []
    for trial in sweep.trials:
        trial_dir = out / "trials" / trial.name
        claim_output_dir(trial_dir, to_yaml(trial.config), f"trial '{trial.name}'")
        status = trial_status(trial_dir)
        if status in ("done", "stopped"):
            why = "summary.json exists" if status == "done" else "stopped early by the scheduler"
            _append_log(out, f"skipped {trial.name} ({why})")
            log(f"[sweep] {trial.name}: skipped ({why})")
        else:
            todo.append(trial)
    tracking = sweep.base.tracking
    parent = open_or_reuse(uri, tracking.experiment, out.name, state.get("parent_run_id"), None,
                           enabled=tracking.enabled)
    if parent.run_id != state.get("parent_run_id"):
        domains = {d.key: {d.kind: list(d.values)} for d in sweep.sweep.parameters}
        parent.log_params({**to_flat_dict(sweep.base), "sweep.parameters": json.dumps(domains),
                           "sweep.num_samples": sweep.sweep.num_samples, "sweep.trials": len(sweep.trials)})
    parent.resume()
    if parent.enabled:
        log(f"[mlflow] parent run {parent.run_id} in {uri}")
    runs = dict(state.get("runs", {}))
    for trial in todo:  # every run exists before Tune starts: trials only log into them
        run = open_or_reuse(uri, tracking.experiment, trial.name, runs.get(trial.name), parent.run_id,
                            enabled=tracking.enabled)
        if run.run_id != runs.get(trial.name):
            run.log_params(to_flat_dict(trial.config))
            run.set_tag("tfft.sweep_trial", trial.name)
        runs[trial.name] = run.run_id
    banks = {t.bank_group: (f"bases/{t.bank_group}/" if t.bank_group else "") + "bank_base.parquet" for t in sweep.trials}
    state = {
        "tracking_uri": uri,
        "parent_run_id": parent.run_id,
        "runs": runs,
        "trials": [{"name": t.name, "params": t.params, "bank": banks[t.bank_group]} for t in sweep.trials],
    }
    state_path.write_text(json.dumps(state, indent=2))
    if todo:
        try:
            _tune(sweep, out, todo, solvers, banks, runs, uri, log)
        except BaseException:
            parent.finish("KILLED")
            raise
    statuses = {t.name: trial_status(out / "trials" / t.name) for t in sweep.trials}
    from pipelines.report import write_report

    write_report(out, run=parent, log=log)
    counts = {s: list(statuses.values()).count(s) for s in dict.fromkeys(statuses.values())}
    parent.finish("FAILED" if "failed" in counts else "KILLED" if "not run" in counts else "FINISHED")
    log("[sweep] " + ", ".join(f"{n} {s}" for s, n in counts.items()) + f"; report in {out / 'report'}")
    if "not run" in counts:
        log("[sweep] interrupted: run the same command again to finish the remaining trials")
    return statuses


def asha_scheduler(sweep: Sweep, trials: list[TrialSpec]) -> Any:
    """The ASHA scheduler of ``sweep.scheduler`` (None without one), on Tune's count of training reports.

    ``stop_last_trials=False``: a trial that reaches its last report must go on to evaluate and record.
    """
    s = sweep.sweep.scheduler
    if s is None:
        return None
    from ray.tune.schedulers import ASHAScheduler

    reports = max(math.ceil(t.config.finetune.steps / t.config.finetune.log_every) for t in trials)
    return ASHAScheduler(
        time_attr="training_iteration", metric=s.metric, mode=s.mode, max_t=max(reports, s.grace_period),
        grace_period=s.grace_period, reduction_factor=s.reduction_factor, stop_last_trials=False,
    )


def _completed_callback() -> Any:
    from ray import tune

    class Completed(tune.Callback):
        """Names of the trials Tune saw end normally (finished, or stopped by the scheduler)."""

        def __init__(self) -> None:
            self.names: set[str] = set()

        def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
            self.names.add(trial.config["trial"])

    return Completed()


def _tune(
    sweep: Sweep,
    out: Path,
    todo: list[TrialSpec],
    solvers: dict[str, str],
    banks: dict[str, str],
    runs: dict[str, str | None],
    uri: str,
    log: Callable[[str], None],
) -> None:
    served, started = {}, []
    for trial in todo:  # a served reward: one Serve application for every trial (joined by name after the first)
        served[trial.name], new = attach_reward(trial.config, log)
        if new:
            started.append(served[trial.name])
    try:
        _tune_served(sweep, out, todo, served, solvers, banks, runs, uri, log)
    finally:
        for cfg in started:
            detach(cfg, True, log=log)


def _tune_served(
    sweep: Sweep,
    out: Path,
    todo: list[TrialSpec],
    served: dict[str, Config],
    solvers: dict[str, str],
    banks: dict[str, str],
    runs: dict[str, str | None],
    uri: str,
    log: Callable[[str], None],
) -> None:
    """:func:`_tune` once the trials' configs point at their served reward (``served``: trial name -> config)."""
    import ray
    from ray import tune

    bases = {}
    for trial in todo:  # one base model and bank per group, before any trial starts
        if trial.bank_group not in bases:
            bank_dir = (out / banks[trial.bank_group]).parent
            bases[trial.bank_group] = prepare_base(served[trial.name], bank_dir, log=log)
    resources = dict(ray.cluster_resources())
    sv = todo[0].config.reward.serve
    if sv.enabled:  # the served reward's replicas hold their CPUs for the whole sweep
        resources["CPU"] = resources.get("CPU", 0.0) - sv.num_cpus * (sv.max_replicas or sv.num_replicas)
    concurrent = plan_concurrency(resources, [t.config for t in todo], sweep.sweep.max_concurrent_trials)
    budget = resources.get("CPU", 0.0) / concurrent - DRIVER_CPUS
    jobs = {}
    for trial in todo:
        cfg = fit_trial(served[trial.name], budget)
        jobs[trial.name] = {
            "name": trial.name,
            "params": trial.params,
            "config": cfg,
            "out": str(out / "trials" / trial.name),
            "sweep_dir": str(out),
            "group": trial.bank_group,
            "solver": solvers[trial.name],
            "uri": uri if runs[trial.name] else None,
            "run_id": runs[trial.name],
            "resources": {
                "driver_cpus": DRIVER_CPUS,
                "cpus_per_worker": cfg.finetune.cpus_per_worker,
                "pool_cpus": [cfg.bank.sampler.num_cpus, cfg.bank.reward.num_cpus],
            },
        }
        (out / "trials" / trial.name / "status.json").unlink(missing_ok=True)
    first = jobs[todo[0].name]["config"]
    log(
        f"[sweep] {len(todo)} trials to run, {concurrent} at a time on {resources.get('CPU', 0):g} CPUs: "
        f"{first.finetune.num_workers} workers x {first.finetune.cpus_per_worker:g} CPU, pools "
        f"{first.bank.sampler.num_cpus:g} + {first.bank.reward.num_cpus:g} CPU per actor"
    )
    scheduler = asha_scheduler(sweep, todo)
    completed = _completed_callback()
    trainable = tune.with_resources(
        tune.with_parameters(_trial_main, jobs=jobs, bases=bases), {"CPU": DRIVER_CPUS}
    )
    tuner = tune.Tuner(
        trainable,
        param_space={"trial": tune.grid_search([t.name for t in todo])},
        tune_config=tune.TuneConfig(
            max_concurrent_trials=concurrent,
            scheduler=scheduler,
            reuse_actors=False,
            trial_name_creator=lambda t: t.config["trial"],
            trial_dirname_creator=lambda t: t.config["trial"],
        ),
        run_config=tune.RunConfig(name="tune", storage_path=str(out / "tune"), verbose=1, callbacks=[completed]),
    )
    for result in tuner.fit():
        name = result.config["trial"]
        trial_dir = out / "trials" / name
        if (trial_dir / "summary.json").is_file():
            continue
        if result.error is not None:
            status = {"status": "failed", "error": _one_line(result.error)}
        elif name in completed.names:  # ended without an error or a summary: the scheduler stopped it
            status = {"status": "stopped", "error": None}
            _append_log(out, f"stopped {name} by the ASHA scheduler")
            RetryingRun(uri if runs[name] else None, runs[name]).finish("KILLED")
        else:  # interrupted (Ctrl-C): left to the next run
            continue
        (trial_dir / "status.json").write_text(json.dumps(status))
