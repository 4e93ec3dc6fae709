"""``tfft sweep``: Ray Tune over the tail level, the KL weight or any other key, from one shared base bank.

    sweep config --(pipelines.sweep.spec: validated trials, before Ray starts)--> base model + bank
    (once per bank group) --> Tune: one driver function per trial, each runs threshold -> fine-tune
    (its own TorchTrainer) -> evaluate into DIR/trials/<name>/ --> DIR/report/ (pipelines.report)

Each trial is a Tune function trainable that builds and fits a TorchTrainer (the Train V2 way); the
trainer's reports reach Tune (and the optional ASHA scheduler) through ``TuneReportCallback``; with
``finetune.backend: local`` the trial runs the loop in its own process and forwards its reports
(`pipelines.sweep.trial`). MLflow holds a parent run for the sweep and a nested run per trial, all created by
this driver before Tune starts; trials only log metrics and artifacts into them, with retries. A trial is done when its
``summary.json`` exists: a restarted sweep skips those trials and resumes the others from their stages
(fine-tuning checkpoints, banks). ``DIR/trials.log`` records what happened to every trial.

One trial's function is `pipelines.sweep.trial`; the scheduler and its checks `pipelines.sweep.scheduler`;
resources `pipelines.sweep.resources`; MLflow runs that retry `pipelines.sweep.tracking`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pipelines.config import to_flat_dict, to_yaml
from pipelines.outdir import claim_output_dir, trial_status
from pipelines.raysession import check_address
from pipelines.serving import detach
from pipelines.schema import Config
from pipelines.stages.base import attach_reward, prepare_base
from pipelines.stages.preflight import RunPlan, resolve_plan
from pipelines.sweep.resources import DRIVER_CPUS, fit_trial, plan_concurrency
from pipelines.sweep.scheduler import asha_scheduler, check_scheduler, completed_callback
from pipelines.sweep.spec import Sweep, TrialSpec
from pipelines.sweep.tracking import RetryingRun, open_or_reuse
from pipelines.sweep.trial import append_log, one_line, trial_main
from pipelines.tracking import resolve_tracking_uri

__all__ = ["run_sweep"]


def run_sweep(sweep: Sweep, out: str | Path, *, log: Callable[[str], None] = print) -> dict[str, str]:
    """Run every trial not yet done; write ``out/report/``. Returns ``{trial name: status}`` with status
    done | stopped (ASHA) | failed | not run."""
    out = Path(out).resolve()
    plans = {t.name: resolve_plan(t.config) for t in sweep.trials}  # config problems before Ray starts
    check_scheduler(sweep, plans)
    check_address(sweep.base.ray)
    claim_output_dir(out, to_yaml(sweep.base), "a sweep")
    state_path = out / "sweep.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    uri = resolve_tracking_uri(sweep.base.tracking.uri)
    if state.get("tracking_uri") != uri:
        state = {}  # another store: new runs there
    todo = _pending_trials(sweep, out, log)
    parent, runs = _open_runs(sweep, out, todo, state, uri, log)
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
            _tune(_Pending(sweep, out, todo, plans, banks, runs, uri, log))
        except BaseException:
            parent.finish("KILLED")
            raise
    statuses = {t.name: trial_status(out / "trials" / t.name) for t in sweep.trials}
    from pipelines.report import write_report

    write_report(out, run=parent, log=log)
    _finish(parent, statuses, out, log)
    return statuses


def _pending_trials(sweep: Sweep, out: Path, log: Callable[[str], None]) -> list[TrialSpec]:
    """The trials to run: each trial's directory claimed for its config, those done or stopped skipped."""
    todo = []
    for trial in sweep.trials:
        trial_dir = out / "trials" / trial.name
        claim_output_dir(trial_dir, to_yaml(trial.config), f"trial '{trial.name}'")
        status = trial_status(trial_dir)
        if status in ("done", "stopped"):
            why = "summary.json exists" if status == "done" else "stopped early by the scheduler"
            append_log(out, f"skipped {trial.name} ({why})")
            log(f"[sweep] {trial.name}: skipped ({why})")
        else:
            todo.append(trial)
    return todo


def _open_runs(sweep: Sweep, out: Path, todo: list[TrialSpec], state: dict[str, Any], uri: str,
               log: Callable[[str], None]) -> tuple[RetryingRun, dict[str, str | None]]:
    """The sweep's parent MLflow run and a nested run per trial to run (``sweep.json``'s when they exist), all
    before Tune starts: trials only log into them. Returns (parent, {trial name: run id})."""
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
    for trial in todo:
        run = open_or_reuse(uri, tracking.experiment, trial.name, runs.get(trial.name), parent.run_id,
                            enabled=tracking.enabled)
        if run.run_id != runs.get(trial.name):
            run.log_params(to_flat_dict(trial.config))
            run.set_tag("tfft.sweep_trial", trial.name)
        runs[trial.name] = run.run_id
    return parent, runs


def _finish(parent: RetryingRun, statuses: dict[str, str], out: Path, log: Callable[[str], None]) -> None:
    """The parent run's status from the trials' (FAILED, KILLED while some did not run, else FINISHED)."""
    counts = {s: list(statuses.values()).count(s) for s in dict.fromkeys(statuses.values())}
    parent.finish("FAILED" if "failed" in counts else "KILLED" if "not run" in counts else "FINISHED")
    log("[sweep] " + ", ".join(f"{n} {s}" for s, n in counts.items()) + f"; report in {out / 'report'}")
    if "not run" in counts:
        log("[sweep] interrupted: run the same command again to finish the remaining trials")


@dataclass(frozen=True)
class _Pending:
    """The trials left to run and what they share: the sweep, its directory, each trial's plan, the bank paths by
    group, the MLflow run ids by trial, the tracking URI and the log."""

    sweep: Sweep
    out: Path
    todo: list[TrialSpec]
    plans: dict[str, RunPlan]
    banks: dict[str, str]
    runs: dict[str, str | None]
    uri: str
    log: Callable[[str], None]


def _tune(pending: _Pending) -> None:
    served, started = {}, []
    for trial in pending.todo:  # a served reward: one Serve application for all trials (joined by name)
        served[trial.name], new = attach_reward(trial.config, pending.log)
        if new:
            started.append(served[trial.name])
    try:
        _tune_served(pending, served)
    finally:
        for cfg in started:
            detach(cfg, True, log=pending.log)


def _tune_served(pending: _Pending, served: dict[str, Config]) -> None:
    """:func:`_tune` once the trials' configs point at their served reward (``served``: trial name -> config)."""
    from ray import tune

    sweep, out, todo, plans, banks, runs, uri, log = (
        pending.sweep, pending.out, pending.todo, pending.plans, pending.banks, pending.runs, pending.uri, pending.log)

    bases = {}
    for trial in todo:  # one base model and bank per group, before any trial starts
        if trial.bank_group not in bases:
            bank_dir = (out / banks[trial.bank_group]).parent
            bases[trial.bank_group] = prepare_base(served[trial.name], bank_dir, log=log)
    cpus, concurrent = _concurrency(sweep, todo)
    budget = cpus / concurrent - DRIVER_CPUS
    jobs = {}
    for trial in todo:
        jobs[trial.name] = _job(trial, fit_trial(served[trial.name], budget), out, plans[trial.name],
                                runs[trial.name], uri)
        (out / "trials" / trial.name / "status.json").unlink(missing_ok=True)
    first = jobs[todo[0].name]["config"]
    log(
        f"[sweep] {len(todo)} trials to run, {concurrent} at a time on {cpus:g} CPUs: "
        f"{first.finetune.num_workers} workers x {first.finetune.cpus_per_worker:g} CPU, pools "
        f"{first.bank.sampler.num_cpus:g} + {first.bank.reward.num_cpus:g} CPU per actor"
    )
    completed = completed_callback()
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(trial_main, jobs=jobs, bases=bases), {"CPU": DRIVER_CPUS}),
        param_space={"trial": tune.grid_search([t.name for t in todo])},
        tune_config=tune.TuneConfig(
            max_concurrent_trials=concurrent,
            scheduler=asha_scheduler(sweep, todo),
            reuse_actors=False,
            trial_name_creator=lambda t: t.config["trial"],
            trial_dirname_creator=lambda t: t.config["trial"],
        ),
        run_config=tune.RunConfig(name="tune", storage_path=str(out / "tune"), verbose=1, callbacks=[completed]),
    )
    for result in tuner.fit():
        _record_outcome(result, out, completed.names, runs, uri)


def _concurrency(sweep: Sweep, todo: list[TrialSpec]) -> tuple[float, int]:
    """(the cluster's CPUs left to the trials, how many trials run at once): a served reward's replicas hold
    their CPUs for the whole sweep."""
    import ray

    resources = dict(ray.cluster_resources())
    sv = todo[0].config.reward.serve
    if sv.enabled:
        resources["CPU"] = resources.get("CPU", 0.0) - sv.num_cpus * (sv.max_replicas or sv.num_replicas)
    concurrent = plan_concurrency(resources, [t.config for t in todo], sweep.sweep.max_concurrent_trials)
    return resources.get("CPU", 0.0), concurrent


def _job(trial: TrialSpec, cfg: Config, out: Path, plan: RunPlan, run_id: str | None, uri: str) -> dict[str, Any]:
    """What `pipelines.sweep.trial.trial_main` reads of a trial; ``cfg`` its config fitted to the CPU budget."""
    return {
        "name": trial.name,
        "params": trial.params,
        "config": cfg,
        "out": str(out / "trials" / trial.name),
        "sweep_dir": str(out),
        "group": trial.bank_group,
        "plan": plan,
        "uri": uri if run_id else None,
        "run_id": run_id,
        "resources": {
            "driver_cpus": DRIVER_CPUS,
            "cpus_per_worker": cfg.finetune.cpus_per_worker,
            "pool_cpus": [cfg.bank.sampler.num_cpus, cfg.bank.reward.num_cpus],
        },
    }


def _record_outcome(result: Any, out: Path, completed: set[str], runs: dict[str, str | None], uri: str) -> None:
    """A trial Tune ended without a ``summary.json``: ``status.json`` says failed (with the error) or stopped by
    the scheduler (its MLflow run KILLED); an interrupted trial is left to the next run."""
    name = result.config["trial"]
    trial_dir = out / "trials" / name
    if (trial_dir / "summary.json").is_file():
        return
    if result.error is not None:
        status = {"status": "failed", "error": one_line(result.error)}
    elif name in completed:  # ended without an error or a summary: the scheduler stopped it
        status = {"status": "stopped", "error": None}
        append_log(out, f"stopped {name} by the ASHA scheduler")
        RetryingRun(uri if runs[name] else None, runs[name]).finish("KILLED")
    else:  # interrupted (Ctrl-C): left to the next run
        return
    (trial_dir / "status.json").write_text(json.dumps(status))
