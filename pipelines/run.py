"""``tfft run``: config -> base model -> base bank -> threshold -> fine-tune -> evaluate -> record.

Every stage leaves its result in the output directory, and a rerun with the same ``--out`` reuses
what is there: bank shards, the fine-tuning checkpoints, the final bank.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from pipelines.bankio import Bank
from pipelines.conditions import conditions_of, per_condition
from pipelines import cond_record
from pipelines.eval_guard import apply_evaluation_check
from pipelines.config import ConfigError, to_flat_dict, to_yaml
from pipelines.trainer import run_finetune
from pipelines.lora import lora_settings, read_adapter, save_lora_checkpoint
from pipelines.models import model_record
from pipelines.outdir import claim_output_dir
from pipelines.plots import plot_rewards
from pipelines.pretrain import BaseModel, load_or_pretrain
from pipelines.raysession import check_address, check_local_capacity, connect
from pipelines.schema import Config
from pipelines.serving import PROXY, attach, detach, served_differentiable
from pipelines.summary import flatten_interval, flatten_invalid, flatten_stats, format_table, invalid_record
from pipelines.summary import flatten_terms, term_record
from pipelines.tracking import TrackedRun, open_run, resolve_tracking_uri
from rewards.base import Reward, load_reward
from pipelines.refinement import refine_threshold
from pipelines.screen_stats import audit_statistics, flatten_screen
from pipelines.screening import bank_for
from tfft.invalid import tilt_rewards
from tfft.tail import Threshold, cvar, solve_threshold
from tfft.target import (
    effective_sample_size,
    pseudo_reward,
    summarize,
    target_interval,
    target_summary,
    tilt_weights,
)

__all__ = ["run_pipeline", "run_bank_only", "prepare_base", "attach_reward", "solve_objective", "run_from_bank", "objective_of", "choose_solver"]


def objective_of(cfg: Config, threshold: Threshold | None) -> dict[str, Any]:
    """The pseudo-reward's parameters: eta None means the plain expected reward (objective.kind=mean)."""
    if cfg.objective.kind == "mean" or threshold is None:
        return {"eta": None, "side": "right", "alpha": 1.0, "kl_weight": cfg.objective.kl_weight}
    return {
        "eta": threshold.eta,
        "side": cfg.objective.side,
        "alpha": cfg.objective.alpha,
        "kl_weight": cfg.objective.kl_weight,
    }


def choose_solver(cfg: Config) -> str:
    """adjoint when the reward has gradients, else weighted; an explicit choice is checked."""
    if cfg.reward.serve.enabled and cfg.reward.target != PROXY:  # never build a served reward on the driver
        differentiable = served_differentiable(cfg)
    else:
        differentiable = bool(load_reward(cfg.reward.target, cfg.reward.kwargs).differentiable)
    solver = cfg.finetune.solver
    if solver == "auto":
        return "adjoint" if differentiable else "weighted"
    if solver == "adjoint" and not differentiable:
        raise ConfigError(
            f"'finetune.solver' is 'adjoint' but reward {cfg.reward.target!r} has no gradients; "
            "use 'weighted' or 'auto'"
        )
    return solver


def _prepare_out(cfg: Config, out: Path) -> None:
    claim_output_dir(out, to_yaml(cfg), "a run")


def run_pipeline(
    cfg: Config,
    out: str | Path,
    *,
    log: Callable[[str], None] = print,
    finetune_callbacks: Sequence[Any] = (),
) -> dict[str, Any]:
    """Run every stage; returns the summary dict (also written to ``out/summary.json``).

    ``finetune_callbacks`` go to every fine-tuning TorchTrainer's ``RunConfig`` (e.g. Tune's
    ``TuneReportCallback``, so that a trial's training reports become its Tune results).
    """
    out = Path(out).resolve()
    solver = choose_solver(cfg)  # config problems surface before Ray starts
    check_address(cfg.ray)
    check_local_capacity(cfg.ray, cfg.finetune)
    for warning in sampler_warnings(cfg, solver):
        log(f"[config] WARNING: {warning}")
    _prepare_out(cfg, out)
    started = time.time()
    base = load_or_pretrain(cfg, log=log)  # a bad data source fails here, before MLflow or Ray
    tracking_uri = resolve_tracking_uri(cfg.tracking.uri)
    run = open_run(tracking_uri, cfg.tracking.experiment, out.name, enabled=cfg.tracking.enabled)
    run.log_params(to_flat_dict(cfg))
    if run.enabled:
        log(f"[mlflow] run {run.run_id} in {tracking_uri}")
    served, started_app = cfg, False
    try:
        served, started_app = attach_reward(cfg, log)
        base, base_bank = prepare_base(served, out, log=log, base=base)
        summary = run_from_bank(served, out, base, base_bank, run=run, solver=solver, log=log,
                                finetune_callbacks=finetune_callbacks)
    except BaseException:
        run.finish("FAILED")
        raise
    finally:
        detach(served, started_app, log=log)
    summary["wall_seconds"] = time.time() - started
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    run.log_artifact(out / "summary.json")
    run.finish()
    log(format_table(summary))
    return summary


def run_bank_only(cfg: Config, out: str | Path, *, log: Callable[[str], None] = print) -> Bank:
    """``tfft bank``: the base model and ``out/bank_base.parquet``; prints the bank's accounting."""
    out = Path(out).resolve()
    check_address(cfg.ray)
    _prepare_out(cfg, out)
    served, started_app = attach_reward(cfg, log)
    try:
        _, bank = prepare_base(served, out, log=log)
    finally:
        detach(served, started_app, log=log)
    log("[bank base] " + ", ".join(f"{k} {v}" for k, v in bank.accounting().items()))
    return bank


def attach_reward(cfg: Config, log: Callable[[str], None]) -> tuple[Config, bool]:
    """With ``reward.serve.enabled``: Ray up, the reward's Serve application running, the config pointing at it
    (`pipelines.serving.attach`). Otherwise the config as it is."""
    if not cfg.reward.serve.enabled:
        return cfg, False
    connect(cfg.ray, log=log)
    return attach(cfg, log=log)


def prepare_base(
    cfg: Config, out: Path, *, log: Callable[[str], None] = print, base: BaseModel | None = None
) -> tuple[BaseModel, Bank]:
    """The pretrained base model (cached; ``base`` when given) and its bank ``out/bank_base.parquet`` (resumable)."""
    base = base if base is not None else load_or_pretrain(cfg, log=log)
    connect(cfg.ray, log=log)
    per = max(len(conditions_of(cfg)), 1)  # bank.size counts samples per condition
    base_bank = bank_for(
        cfg, (base.config, base.state_dict), size=cfg.bank.size * per, label="base", out_path=out / "bank_base.parquet",
        tilted=True, log=log,
    )
    if base_bank.n_valid < 2:
        raise RuntimeError(f"the base bank has {base_bank.n_valid} valid samples; the threshold needs at least 2")
    return base, base_bank


def solve_objective(
    cfg: Config, base_bank: Bank, *, run: Any = None, log: Callable[[str], None] = print
) -> tuple[Threshold | None, dict[str, Any]]:
    """Threshold eta* on the bank's valid rewards (None for objective.kind=mean) and the pseudo-reward params.

    With conditions and ``objective.per_condition`` the thresholds are solved per condition
    (`pipelines.cond_record.solve_thresholds`), the returned threshold is None and ``objective["eta"]`` is the
    list of eta*_c; otherwise one eta* on the pooled bank.
    """
    threshold = None
    if cfg.objective.kind == "cvar" and per_condition(cfg):
        thresholds = cond_record.solve_thresholds(cfg, base_bank, log)
        if run is not None:
            from pipelines.conditions import metric_prefix

            for value, th in zip(conditions_of(cfg), thresholds):
                run.log_metrics({f"{metric_prefix(value)}/threshold.{k}": v for k, v in th.to_dict().items()})
        return None, {**objective_of(cfg, None), "eta": [th.eta for th in thresholds], "side": cfg.objective.side,
                      "alpha": cfg.objective.alpha}
    if cfg.objective.kind == "cvar":
        reward, valid = base_bank.scored(cfg.objective.invalid_reward)
        threshold = solve_threshold(
            reward,
            side=cfg.objective.side,
            alpha=cfg.objective.alpha,
            kl_weight=cfg.objective.kl_weight,
            valid=valid,
        )
        n_failed = len(base_bank) - base_bank.n_valid
        rule = (f"{n_failed} invalid samples excluded" if cfg.objective.invalid_reward is None
                else f"{n_failed} invalid samples at reward {cfg.objective.invalid_reward:g}")
        log(
            f"[threshold] eta* = {threshold.eta:.4f}, J = {threshold.value:.4f}, ESS = {threshold.ess:.0f}, "
            f"active fraction = {threshold.active_fraction:.3f} ({rule})"
        )
        if threshold.ess < cfg.threshold.ess_warning:
            log(
                f"[threshold] WARNING: ESS {threshold.ess:.0f} < {cfg.threshold.ess_warning:.0f}: the bank sees the "
                "target poorly; target statistics are unreliable (raise bank.size or kl_weight)"
            )
        if run is not None:  # a TrackedRun (possibly disabled)
            run.log_metrics({f"threshold.{k}": v for k, v in threshold.to_dict().items()})
    return threshold, objective_of(cfg, threshold)


def run_from_bank(
    cfg: Config,
    out: Path,
    base: BaseModel,
    base_bank: Bank,
    *,
    run: TrackedRun,
    solver: str,
    log: Callable[[str], None] = print,
    finetune_callbacks: Sequence[Any] = (),
) -> dict[str, Any]:
    """Threshold -> fine-tune -> evaluate -> record, from an existing base bank, into ``out``.

    Each stage's result in ``out`` (``checkpoint/model.pt``, ``bank_final.parquet``) is reused on a rerun.
    ``finetune_callbacks``: see `run_pipeline`.
    """
    out.mkdir(parents=True, exist_ok=True)
    threshold, objective = solve_objective(cfg, base_bank, run=run, log=log)
    callbacks = list(finetune_callbacks)
    state = _finetune_cached(cfg, out, base, base_bank, objective, solver, run, log, callbacks=callbacks)
    refinement = None
    if cfg.threshold.refine_rounds and threshold is not None:
        previous = [out]  # the run whose checkpoint the next round warm-starts from (its LoRA adapter)

        def finetune_round(out_k: Path, objective_k: dict[str, Any], init: dict[str, torch.Tensor]) -> Any:
            adapter = read_adapter(previous[0] / "checkpoint") if cfg.finetune.lora.enabled else None
            state_k = _finetune_cached(cfg, out_k, base, base_bank, objective_k, solver, run, log, init_state=init,
                                       init_adapter=adapter, steps=cfg.threshold.refine_steps or None,
                                       callbacks=callbacks)
            previous[0] = out_k
            return state_k

        state, objective, refinement = refine_threshold(
            cfg, out, base, base_bank, objective, state, run=run, log=log, finetune=finetune_round,
        )
    final_bank = bank_for(
        cfg, (base.config, state), size=cfg.eval.size * max(len(conditions_of(cfg)), 1), label="final",
        out_path=out / "bank_final.parquet", tilted=False, log=log,
    )
    # refinement keeps its rounds' own states (its table shows each round); with conditions the evaluation
    # check is not run (its statistic is pooled, and the base bank's rows are not an evaluation bank per condition)
    if refinement is None and not conditions_of(cfg):
        final_bank = apply_evaluation_check(cfg, out, base.state_dict, base_bank, final_bank, objective, log=log)
    summary = _record(cfg, out, run, base_bank, final_bank, threshold, objective, solver)
    summary["model"] = model_record(base.config, cfg.model.checkpoint)  # banks hold samples flattened
    if refinement is not None:
        summary["refinement"] = refinement
    return summary


def _finetune_cached(
    cfg: Config,
    out: Path,
    base: BaseModel,
    base_bank: Bank,
    objective: dict[str, Any],
    solver: str,
    run: TrackedRun,
    log: Callable[[str], None],
    *,
    init_state: dict[str, torch.Tensor] | None = None,
    steps: int | None = None,
    callbacks: list[Any] | None = None,
    init_adapter: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Fine-tune into ``out/checkpoint/model.pt``, or load it when a previous run finished it.

    With ``finetune.lora`` the state is the merged network, and ``out/checkpoint`` also gets the adapter
    (``save_pretrained``; ``init_adapter`` warm-starts it) and, with ``merge``, ``merged.safetensors``."""
    model_path = out / "checkpoint" / "model.pt"
    if model_path.is_file():
        log(f"[finetune] reusing {model_path}")
        return torch.load(model_path, map_location="cpu", weights_only=True)["state_dict"]
    weighted = solver == "weighted"
    tilt, rows = None, None
    conditional = bool(conditions_of(cfg))
    if weighted and conditional:  # per condition, each condition's weights summing to 1/C
        tilt, rows = cond_record.tilt_by_condition(base_bank, objective, cfg.objective.invalid_reward)
        log(f"[finetune] weighted flow matching on {int(rows.sum())} bank samples of {len(conditions_of(cfg))} "
            f"conditions, ESS of the frozen weights {effective_sample_size(tilt[rows]):.0f}")
    elif weighted:  # failures at the invalid reward, or neutral (tfft.invalid.tilt_rewards); rows with a finite x
        reward, rows = tilt_rewards(base_bank.reward, base_bank.valid, cfg.objective.invalid_reward, objective["eta"])
        rows = rows & np.isfinite(base_bank.x).all(axis=1)
        tilt = tilt_weights(np.where(rows, reward, np.nan), valid=rows, **objective)
        log(f"[finetune] weighted flow matching on {int(rows.sum())} bank samples, "
            f"ESS of the frozen weights {effective_sample_size(tilt):.0f}")
    started = time.time()
    result = run_finetune(
        name="finetune",
        storage_path=str(out / "train"),
        model_config=base.config,
        base_state=base.state_dict,
        objective=objective,
        finetune=cfg.finetune,
        reward_target=cfg.reward.target,
        reward_kwargs=dict(cfg.reward.kwargs),
        seed=cfg.seed,
        solver=solver,
        bank_x=base_bank.x[rows] if weighted else None,
        bank_weights=tilt[rows] if weighted else None,
        mlflow=run.worker_args(),
        init_state=init_state,
        steps=steps,
        callbacks=callbacks or None,
        sde_steps=training_steps(cfg),
        guard_baseline=(cond_record.base_objective(base_bank, objective) if conditional
                        else _base_objective(base_bank, objective)),
        conditions=conditions_of(cfg) or None,
        bank_cond=base_bank.cond[rows] if weighted and conditional else None,
        min_valid_fraction=max(base_bank.n_valid / max(len(base_bank.valid), 1) - cfg.finetune.guard_validity_drop, 0.0),
        log=log,
        lora=lora_settings(cfg.finetune.lora),
        init_adapter=init_adapter,
    )
    model_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = model_path.with_suffix(".tmp")
    seconds = time.time() - started
    log(f"[finetune] done in {seconds:.0f}s")
    guard = {"kept": result.kept, "reason": result.kept_reason, "stopped_early": result.stopped_early}
    blob = {"config": base.config, "state_dict": result.state_dict, "solver": solver, "objective": objective,
            "seconds": seconds, "loop_seconds": result.loop_seconds, "guard": guard}
    if result.lora is not None:  # the adapter files first: model.pt marks the stage done
        save_lora_checkpoint(model_path.parent, result.lora, merge=cfg.finetune.lora.merge)
        blob["lora"] = result.lora_record
        _log_lora(run, result.lora_record)
    torch.save(blob, tmp)
    tmp.replace(model_path)
    return result.state_dict


def _log_lora(run: TrackedRun, record: dict[str, Any]) -> None:
    """MLflow params of the LoRA run (the config's ``finetune.lora.*`` are logged with the config)."""
    run.log_params({"lora.target_modules": ",".join(record["target_modules"]),
                    "lora.trainable_parameters": record["trainable"], "lora.total_parameters": record["total"]})
    if "peak_memory_bytes" in record:
        run.log_metrics({"lora.peak_memory_bytes": float(record["peak_memory_bytes"])})


def _base_objective(bank: Bank, objective: dict[str, Any]) -> float:
    """E_q[g] on the bank's valid samples: the running objective of the base model (its KL is 0)."""
    r = bank.reward[bank.valid]
    g = pseudo_reward(r, eta=objective["eta"], side=objective["side"], alpha=objective["alpha"])
    return float(g.mean()) if g.size else float("nan")


def training_steps(cfg: Config) -> int:
    """K of the fine-tuning trajectories: ``finetune.sde_steps``, or the bank sampler's ``sampler.steps`` (0)."""
    return int(cfg.finetune.sde_steps or cfg.sampler.steps)


def _finetune_record(out: Path) -> dict[str, Any]:
    """What the fine-tuning stage recorded with its checkpoint: wall time and the guard's decision."""
    path = out / "checkpoint" / "model.pt"
    if not path.is_file():
        return {}
    blob = torch.load(path, map_location="cpu", weights_only=True)
    seconds, loop = blob.get("seconds"), blob.get("loop_seconds")
    return {"seconds": None if seconds is None else float(seconds), "guard": blob.get("guard"),
            "loop_seconds": None if loop is None else float(loop), "lora": blob.get("lora")}


def sampler_record(cfg: Config) -> dict[str, Any]:
    """The samplers of the run, for ``summary.json``: banks and evaluation vs fine-tuning trajectories."""
    record: dict[str, Any] = {"kind": cfg.sampler.kind, "steps": cfg.sampler.steps, "finetune_sde_steps": training_steps(cfg)}
    if cfg.sampler.kind == "ode":
        record["grid"] = cfg.sampler.grid
    record["same_as_finetune"] = cfg.sampler.kind == "sde" and cfg.sampler.steps == training_steps(cfg)
    return record


def sampler_warnings(cfg: Config, solver: str) -> list[str]:
    """Configurations that work but weaken the result: two samplers, too little tail signal per update."""
    warnings = []
    if solver == "adjoint" and not sampler_record(cfg)["same_as_finetune"]:
        warnings.append(
            f"the banks use sampler {cfg.sampler.kind} with {cfg.sampler.steps} steps but fine-tuning uses the SDE with "
            f"{training_steps(cfg)} steps: target statistics describe the bank sampler's tilt, so the fine-tuned vs "
            "target gap mixes two samplers"
        )
    if solver == "adjoint" and cfg.objective.kind == "cvar" and cfg.objective.alpha < 1:
        expected = cfg.finetune.batch_size * cfg.finetune.oversample * cfg.objective.alpha
        if expected < 16:
            warnings.append(
                f"about {expected:.0f} trajectories per update carry gradient (batch_size {cfg.finetune.batch_size} x "
                f"oversample {cfg.finetune.oversample} x alpha {cfg.objective.alpha:g}); aim for 16 or more: raise "
                "finetune.batch_size or finetune.oversample"
            )
    return warnings


def _record(
    cfg: Config,
    out: Path,
    run: Any,
    base_bank: Bank,
    final_bank: Bank,
    threshold: Threshold | None,
    objective: dict[str, Any],
    solver: str,
) -> dict[str, Any]:
    invalid_reward = cfg.objective.invalid_reward
    base_r, base_v = base_bank.scored(invalid_reward)
    final_r, final_v = final_bank.scored(invalid_reward)
    base_stats = _stats(summarize(base_r, valid=base_v), base_bank)
    final_stats = _stats(summarize(final_r, valid=final_v), final_bank)
    tilt = {key: objective[key] for key in ("eta", "side", "alpha", "kl_weight")}
    conditional, per_cond, cond_metrics = bool(conditions_of(cfg)), None, {}
    if conditional:  # the pooled target is the mixture of the per-condition tilts; intervals are per condition
        per_cond, target_stats, cond_metrics = cond_record.conditional_record(
            cfg, base_bank, final_bank, None if threshold is not None else _thresholds_of(cfg, base_bank, objective),
            threshold, objective)
        interval, screened = None, {}
    else:
        target_stats = _stats(target_summary(base_r, valid=base_v, **objective), base_bank)
        interval = target_interval(base_r, valid=base_v, seed=cfg.seed, **tilt).to_dict()
        # screened banks (reward.screen): what the certified tail cannot give comes from the audit
        screened = audit_statistics({"base": (base_bank, base_r, base_v), "finetuned": (final_bank, final_r, final_v)},
                                    {"base": base_stats, "finetuned": final_stats, "target": target_stats}, interval,
                                    objective=tilt, tolerance=cfg.reward.screen.tolerance, seed=cfg.seed)
    record = _finetune_record(out)
    summary: dict[str, Any] = {
        "threshold": threshold.to_dict() if threshold is not None else None,
        "base": base_stats,
        "finetuned": final_stats,
        "target": target_stats,
        "target_interval": interval,
        "objective": {"kind": cfg.objective.kind, **objective},
        "solver": solver,
        "finetune_seconds": record.get("seconds"),
        "finetune_loop_seconds": record.get("loop_seconds"),
        "guard": record.get("guard"),
        "sampler": sampler_record(cfg),
        "failures": {"base": base_bank.accounting(), "final": final_bank.accounting()},
        "invalid": invalid_record(invalid_reward, {"base": (base_bank.reward, base_bank.valid),
                                                   "finetuned": (final_bank.reward, final_bank.valid)}),
        **screened,
    }
    if record.get("lora") is not None:
        summary["lora"] = record["lora"]
    if per_cond is not None:
        summary["conditions"] = conditions_of(cfg)
        summary["per_condition"] = per_cond
    metrics: dict[str, float] = flatten_screen(screened)
    metrics.update(cond_metrics)
    for name in ("base", "finetuned", "target"):
        metrics.update(flatten_stats(name, summary[name]))
    if interval is not None:
        metrics.update(flatten_interval("target", interval))
    reward = load_reward(cfg.reward.target, cfg.reward.kwargs)
    terms = term_record({"base": base_bank.terms, "finetuned": final_bank.terms}, getattr(reward, "term_weights", None))
    if terms:  # a reward with terms (rewards.compose:WeightedSum): each term's statistics
        summary["terms"] = terms
        metrics.update(flatten_terms(terms))
    extra = _describe(reward, base_bank, final_bank)
    if extra:
        summary["samples"] = extra
        for label, values in extra.items():
            metrics.update({f"{label}.{k}": float(v) for k, v in values.items()})
    for label, counts in summary["failures"].items():
        metrics.update({f"bank_{label}.{k}": float(v) for k, v in counts.items()})
    metrics.update(flatten_invalid(summary["invalid"]))
    run.log_metrics(metrics, step=cfg.finetune.steps)
    side, alpha = (cfg.objective.side, cfg.objective.alpha) if cfg.objective.kind == "cvar" else ("right", 0.1)
    plot_rewards(
        out / "rewards.png",
        base_r[_evaluated(base_bank, base_v)],
        final_r[_evaluated(final_bank, final_v)],
        eta=None if isinstance(objective["eta"], list) else objective["eta"],
        side=side,
        alpha=alpha,
        cvar_base=_own_cvar(base_stats, base_r[base_v], side, alpha),
        cvar_finetuned=_own_cvar(final_stats, final_r[final_v], side, alpha),
        title=f"{cfg.objective.kind} objective, side={side}, alpha={alpha:g}, kl_weight={cfg.objective.kl_weight:g}",
    )
    run.log_artifact(out / "rewards.png")
    conds = {} if base_bank.cond is None else {"base_cond": _values(base_bank), "final_cond": _values(final_bank)}
    for path in reward.figures(out, base_bank.x, base_bank.valid, final_bank.x, final_bank.valid, **conds):
        run.log_artifact(path)
    return summary


def _thresholds_of(cfg: Config, bank: Bank, objective: dict[str, Any]) -> list[Threshold] | None:
    """The per-condition thresholds behind ``objective["eta"]`` (a list), re-solved for their records; None when
    the objective has one threshold or none."""
    if not isinstance(objective["eta"], list):
        return None
    return cond_record.solve_thresholds(cfg, bank, log=lambda _: None)


def _own_cvar(stats: dict[str, Any], rewards: np.ndarray, side: str, alpha: float) -> float:
    """CVaR_alpha from the recorded statistics (a screened bank's come from its certified tail or audit), computed
    from ``rewards`` only when alpha is not one of the recorded levels."""
    recorded = stats[f"cvar_{side}"].get(f"{alpha:g}")
    return recorded if recorded is not None else cvar(rewards, side=side, alpha=alpha)


def _evaluated(bank: Bank, valid: np.ndarray) -> np.ndarray:
    """The rows with a reward of their own (a screened bank's skipped rows hold a placeholder)."""
    return valid & bank.evaluated if bank.screened else valid


def _stats(summary: Any, bank: Bank) -> dict[str, Any]:
    """A `TailSummary` as a dict whose ``n_valid`` counts the samples whose reward succeeded (under an invalid
    reward every sample enters the statistics, but the row still says how many failed)."""
    out = summary.to_dict()
    out["n_valid"] = bank.n_valid
    return out


def _describe(reward: Reward, base_bank: Bank, final_bank: Bank) -> dict[str, dict[str, float]]:
    """A reward's own statistics of the samples (``Reward.describe``; none by default), per bank."""
    stats = {
        label: {k: float(v) for k, v in reward.describe(bank.x, bank.valid, **_cond_kwarg(bank)).items()}
        for label, bank in (("base", base_bank), ("finetuned", final_bank))
    }
    return stats if stats["base"] or stats["finetuned"] else {}


def _values(bank: Bank) -> list[Any]:
    """The condition value of every row of a conditional bank."""
    return [bank.conditions[int(i)] for i in bank.cond]


def _cond_kwarg(bank: Bank) -> dict[str, Any]:
    """``{"cond": values}`` for a conditional bank (a reward hook's keyword), else nothing."""
    return {} if bank.cond is None else {"cond": _values(bank)}
