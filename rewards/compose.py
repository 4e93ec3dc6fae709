"""Several rewards at once: ``rewards.compose:WeightedSum``, r(x) = sum_k w_k r_k(x).

Each term is any reward the pipeline accepts (a :class:`rewards.base.Reward` class, a plain function, a
ready instance), given as ``{target, kwargs, weight, name}``; ``kwargs`` (default none), ``weight``
(default 1.0) and ``name`` are optional. ``name`` defaults to the target's attribute name
(``rewards.toy2d:TailReward2D`` -> ``TailReward2D``), made unique with ``_2``, ``_3``... Example (YAML)::

    reward:
      target: rewards.compose:WeightedSum
      kwargs:
        terms:
          - {target: rewards.toy2d:TailReward2D, weight: 1.0}
          - {target: rewards.toy2d:distance_penalty, weight: 0.2, name: distance}

Contract, for x of shape (n, d):

- **value**: ``rewards`` (n,) = sum_k w_k r_k, summed in term order.
- **validity is the conjunction**: a sample is invalid when any term failed on it (or the sum is not
  finite: 'nan'); its reason is that of the first failing term, in term order ('timeout', 'crash', 'nan',
  'malformed', 'exception', as the terms report them).
- **terms**: every result carries each term's raw, unweighted value, name -> (n,) float64, NaN where that
  term failed (other terms keep their values); the bank stores them as columns ``term.<name>`` and the run
  summarises each (``summary.json["terms"]``).
- **gradients**: ``differentiable`` is True only when every term is; then :meth:`WeightedSum.evaluate_with_grad`
  returns sum_k w_k grad r_k from each term's own ``evaluate_with_grad`` (rows of invalid samples zero).
  Otherwise the pipeline fine-tunes with the weighted solver.
- **robust evaluation** (:meth:`WeightedSum.evaluate_detailed`, what the reward pool calls): the terms are
  evaluated one after the other on all n samples; a term with its own ``evaluate_detailed``
  (`rewards.http.Endpoint`, `rewards.simulator.Command`) with its own settings, an in-process term through
  :func:`rewards.robust.evaluate_reward_robust` with the reward pool's settings (chunks, retries, bisection).
  A term whose evaluation raises as a whole fails every sample with reason 'exception' and is logged; the
  other terms' values stay. ``attempts`` and ``seconds`` are summed over the terms. Every sample is accounted
  for once.
- **cache identity** (:meth:`WeightedSum.value_kwargs`): each term's name, target, value kwargs (its own
  ``value_kwargs()``, else its kwargs), weight and version, plus the composite's ``version``: changing a term,
  a weight or a name changes the key; a term's timeout or batching does not.

A sample whose composite reason is deterministic ('nan') is cached whole: a term that failed transiently on
it keeps its NaN column there (the sample is invalid either way).

Picklable (plain attributes and the terms' rewards): it travels to Ray actors like any reward.

The term specs' checks and default names are :mod:`rewards.compose_spec`'s; checking the terms' robust results
and the composite's failure reasons, :mod:`rewards.compose_results`'.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rewards.base import Reward, RewardBatch, load_reward
from rewards.compose_results import checked_result, failed_result, first_reasons
from rewards.compose_spec import TERM_KEYS, check_spec, default_name, unique_name
from rewards.robust import (
    DEFAULT_BACKOFF_S,
    DEFAULT_MAX_IN_FLIGHT,
    DEFAULT_RETRIES,
    RobustResult,
    evaluate_reward_robust,
)

__all__ = ["WeightedSum", "Term", "TERM_KEYS"]

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Term:
    """One term of a :class:`WeightedSum`: its unique ``name``, import path, kwargs, weight and reward."""

    name: str
    target: str
    kwargs: dict[str, Any]
    weight: float
    reward: Reward


def _build_terms(terms: Any) -> list[Term]:
    """The checked, named and loaded terms of ``terms`` (a non-empty list of specs); ValueError naming the term."""
    if isinstance(terms, (str, bytes, Mapping)) or not isinstance(terms, Sequence) or not terms:
        raise ValueError(f"WeightedSum: terms must be a non-empty list of {{target, kwargs, weight}}, got {terms!r}")
    specs = [check_spec(i, spec) for i, spec in enumerate(terms)]
    explicit: dict[str, int] = {}
    for i, (_, _, _, name) in enumerate(specs):
        if name is not None:
            if name in explicit:
                raise ValueError(f"WeightedSum: terms[{i}].name {name!r} repeats the name of terms[{explicit[name]}]")
            explicit[name] = i
    taken, out = set(explicit), []
    for i, (target, kwargs, weight, name) in enumerate(specs):
        if name is None:
            name = unique_name(default_name(target), taken)
            taken.add(name)
        try:
            reward = load_reward(target, kwargs)
        except ValueError as exc:
            raise ValueError(f"WeightedSum: terms[{i}].target: {exc}") from exc
        out.append(Term(name, target, kwargs, weight, reward))
    return out


class WeightedSum(Reward):
    """r(x) = sum_k w_k r_k(x) over several rewards; each r_k is reported as well (see the module doc).

    Args:
        terms: a non-empty list of ``{target, kwargs, weight, name}`` (``target`` required; ``kwargs``
            default none, ``weight`` default 1.0, ``name`` default the target's attribute name, made unique).
        name: identity of the composite (default ``weighted_sum:`` + the term names joined by '+').
        version: bump it when the composite's values change in a way its terms do not show (it keys caches).

    Raises ValueError naming the term's index and key: an empty list, a term that is not a mapping, an
    unknown key, a missing target, a weight that is not a finite number, a duplicate name, a target that
    does not load with its kwargs.
    """

    robust_settings = True

    def __init__(self, terms: Sequence[Mapping[str, Any]], name: str | None = None, version: str = "1"):
        self.terms = _build_terms(terms)
        self.term_names = tuple(t.name for t in self.terms)
        self.differentiable = all(bool(t.reward.differentiable) for t in self.terms)
        if name is not None and (not isinstance(name, str) or not name):
            raise ValueError(f"WeightedSum: name must be a non-empty string or None, got {name!r}")
        self.name = name or "weighted_sum:" + "+".join(self.term_names)
        if not isinstance(version, (str, int)) or isinstance(version, bool):
            raise ValueError(f"WeightedSum: version must be a string, got {version!r}")
        self.version = str(version)

    @property
    def term_weights(self) -> dict[str, float]:
        """name -> weight, in term order."""
        return {t.name: t.weight for t in self.terms}

    # -- in-process evaluation (torch) -------------------------------------------------------------------

    def _combine(self, batches: list[RewardBatch], n: int) -> RewardBatch:
        """The terms' batches -> the composite's: weighted sum, conjunction, first reason, summed attempts.

        ``rewards`` and ``valid`` stay on the device of the terms' rewards; ``attempts`` and ``terms`` are on the CPU."""
        total: torch.Tensor | None = None
        valids, reasons, terms = [], [], {}
        attempts = torch.zeros(n, dtype=torch.int64)
        for term, out in zip(self.terms, batches):
            r = out.rewards.reshape(-1).to(torch.float64)
            if r.shape[0] != n:
                raise ValueError(f"term {term.name!r} returned {r.shape[0]} rewards for {n} samples")
            ok = out.valid.detach().cpu().reshape(-1).to(torch.bool) & torch.isfinite(r.detach().cpu())
            total = term.weight * r if total is None else total + term.weight * r
            valids.append(ok.numpy())
            reasons.append(list(out.errors) if out.errors is not None else [""] * n)
            terms[term.name] = torch.where(ok, r.detach().cpu(), torch.full_like(r.detach().cpu(), math.nan))
            attempts += out.attempts.detach().cpu().to(torch.int64) if out.attempts is not None else 1
        assert total is not None
        errors = first_reasons(valids, reasons, torch.isfinite(total.detach().cpu()).numpy())
        valid = torch.tensor([e == "" for e in errors], dtype=torch.bool, device=total.device)  # where x lives
        rewards = torch.where(valid, total, torch.full_like(total, math.nan))
        return RewardBatch(rewards, valid, None if all(e == "" for e in errors) else errors, attempts, terms)

    def evaluate(self, x: torch.Tensor) -> RewardBatch:
        """x: (n, d) -> RewardBatch with ``terms`` (each term's own value); differentiable when every term is.

        Each term's ``evaluate`` is called on all of x; an exception of a term propagates (the reward pool
        uses :meth:`evaluate_detailed`, where it does not)."""
        if x.ndim != 2:
            raise ValueError(f"WeightedSum expects samples of shape (n, d), got {tuple(x.shape)}")
        return self._combine([t.reward.evaluate(x) for t in self.terms], x.shape[0])

    def evaluate_with_grad(self, x: torch.Tensor) -> tuple[RewardBatch, torch.Tensor]:
        """Rewards and sum_k w_k grad r_k (n, d), from each term's ``evaluate_with_grad``; invalid rows zero."""
        if not self.differentiable:
            lacking = [t.name for t in self.terms if not t.reward.differentiable]
            raise TypeError(f"reward {self.name!r} has no gradients: term(s) {lacking} are not differentiable")
        outs = [t.reward.evaluate_with_grad(x) for t in self.terms]
        batch = self._combine([out for out, _ in outs], x.shape[0])
        grad = torch.zeros_like(x)
        for term, (_, g) in zip(self.terms, outs):
            grad = grad + term.weight * g.to(grad.dtype)
        valid = batch.valid.to(grad.device)
        grad = torch.where(valid[:, None], grad, torch.zeros_like(grad)).detach()
        return RewardBatch(batch.rewards.detach(), batch.valid, batch.errors, batch.attempts, batch.terms), grad

    # -- robust evaluation (what the reward pool calls) ----------------------------------------------------

    def evaluate_detailed(
        self,
        x: np.ndarray,
        *,
        batch_size: int | None = None,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        retries: int = DEFAULT_RETRIES,
        backoff_s: float = DEFAULT_BACKOFF_S,
        split: bool = True,
    ) -> RobustResult:
        """Every term robustly on ``x`` (n, d) float64, combined; see the module doc.

        The keywords are the reward pool's call settings (``bank.reward.*``), used for in-process terms
        (``batch_size`` None: all n samples per call); terms with their own ``evaluate_detailed`` use theirs.
        """
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2:
            raise ValueError(f"WeightedSum expects samples of shape (n, d), got {x.shape}")
        n = x.shape[0]
        settings = {"batch_size": batch_size or max(n, 1), "max_in_flight": max_in_flight, "retries": retries,
                    "backoff_s": backoff_s, "split": split}
        results = []
        for term in self.terms:
            start = time.perf_counter()
            try:
                res = checked_result(evaluate_reward_robust(term.reward, x, **settings), n, term.name)
            except Exception as exc:  # a term failing as a whole costs its verdicts, not the other terms'
                _log.warning("term %r of %s failed on %d samples: %s: %s", term.name, self.name, n,
                             type(exc).__name__, exc)
                res = failed_result(n, time.perf_counter() - start)
            results.append(res)
        total = np.zeros(n)
        terms: dict[str, np.ndarray] = {}
        valids = []
        for k, (term, res) in enumerate(zip(self.terms, results)):
            r = np.asarray(res.rewards, dtype=np.float64)
            ok = np.asarray(res.valid, dtype=bool) & np.isfinite(r)
            total = term.weight * r if k == 0 else total + term.weight * r
            terms[term.name] = np.where(ok, r, np.nan)
            valids.append(ok)
        errors = first_reasons(valids, [list(res.errors) for res in results], np.isfinite(total))
        valid = np.array([e == "" for e in errors], dtype=bool)
        return RobustResult(
            rewards=np.where(valid, total, np.nan),
            valid=valid,
            errors=errors,
            attempts=np.sum([np.asarray(res.attempts, dtype=np.int64) for res in results], axis=0).astype(np.int64),
            seconds=np.sum([np.asarray(res.seconds, dtype=np.float64) for res in results], axis=0),
            n_calls=sum(int(res.n_calls) for res in results),
            terms=terms,
        )

    # -- identity and reporting ------------------------------------------------------------------------------

    def value_kwargs(self) -> dict[str, Any]:
        """Each term's name, target, value kwargs, weight and version: the cache key (with ``version``)."""
        out = []
        for term in self.terms:
            own = term.reward.value_kwargs()
            out.append({
                "name": term.name,
                "target": term.target,
                "kwargs": term.kwargs if own is None else own,
                "weight": term.weight,
                "version": str(term.reward.version),
            })
        return {"terms": out}

    def describe(self, x: Any, valid: Any) -> dict[str, float]:
        """The terms' own statistics of the samples, keys ``<term name>.<key>``."""
        return {f"{t.name}.{k}": float(v) for t in self.terms for k, v in t.reward.describe(x, valid).items()}

    def figures(self, out_dir: Any, base_x: Any, base_valid: Any, final_x: Any, final_valid: Any) -> list[Any]:
        """The terms' own figures (a later term's file of the same name replaces an earlier one's)."""
        paths: list[Any] = []
        for term in self.terms:
            for path in term.reward.figures(out_dir, base_x, base_valid, final_x, final_valid):
                if Path(path) not in {Path(p) for p in paths}:
                    paths.append(path)
        return paths

    def __repr__(self) -> str:
        parts = ", ".join(f"{t.name}={t.target} x {t.weight:g}" for t in self.terms)
        return f"WeightedSum({parts})"
