"""The reward interface: a batch of samples in, rewards and a validity mask out.

Every reward the pipeline sees is a :class:`Reward`. A user may instead give a plain function
``f(x: Tensor (n, d), **kwargs) -> Tensor (n,)``; :func:`load_reward` wraps it in a
:class:`FunctionReward` whose gradient comes from autograd. Rewards are loaded from config by import
path ``package.module:Name`` plus keyword arguments, and must be picklable (they travel to Ray actors).

Conditions (``data.conditions``): a conditional run calls ``evaluate(x, cond=values)`` with ``values`` the python
list of the n samples' condition values (None without conditions), and ``evaluate_with_grad(x, cond=values)``.
A plain function may take ``(x)`` or ``(x, cond)``: its signature is inspected once. A reward that cannot take
conditions keeps working unconditionally; :func:`reward_takes_cond` tells the config check which is which.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
from dataclasses import dataclass
from typing import Any, Callable

import torch

__all__ = ["RewardBatch", "Reward", "FunctionReward", "source_version", "import_object", "load_reward",
           "reward_takes_cond"]


@dataclass(frozen=True)
class RewardBatch:
    """Rewards of one batch.

    Attributes:
        rewards: (n,) float64; NaN where the sample is invalid.
        valid: (n,) bool; False where the reward could not be computed (failure, NaN, bad sample).
        errors: per-sample failure reason ('' when valid), or None when every sample is valid.
            Reasons used by the pipeline: 'timeout', 'crash', 'nan', 'malformed', 'exception'.
        attempts: (n,) int, calls that each sample took (retries included), or None (one each).
        terms: per-sample parts of the reward, name -> (n,) float64 (NaN where that part failed), or None.
            A reward that reports them declares their names in :attr:`Reward.term_names`
            (`rewards.compose.WeightedSum`: each term's own value); the bank stores them as columns
            ``term.<name>`` when they come through ``evaluate_detailed`` (`rewards.robust.RobustResult.terms`).
    """

    rewards: torch.Tensor
    valid: torch.Tensor
    errors: list[str] | None = None
    attempts: torch.Tensor | None = None
    terms: dict[str, torch.Tensor] | None = None


class Reward:
    """Base class of rewards (higher is better).

    Subclasses implement :meth:`evaluate`. Set ``differentiable = True`` when :meth:`evaluate` is
    differentiable by autograd with respect to ``x`` (then adjoint matching can use it); otherwise the
    pipeline fine-tunes with the gradient-free weighted solver. ``version`` enters the reward's identity
    (caching): bump it whenever the reward's values change.

    ``term_names``: the names of the per-sample terms the reward reports with its values
    (:attr:`RewardBatch.terms`, `rewards.robust.RobustResult.terms`); each becomes a bank column
    ``term.<name>``. Default: none. ``term_weights``: name -> weight of those terms, recorded with each term's
    statistics (``summary.json["terms"]``); None (the default) when the reward has no weights to report.
    ``robust_settings``: True when :meth:`evaluate_detailed` takes the reward
    pool's call settings as keywords (``batch_size``, ``max_in_flight``, ``retries``, ``backoff_s``,
    ``split``) for what it evaluates in-process (`rewards.compose.WeightedSum`). Default: False.
    """

    name: str = "reward"
    version: str = "1"
    differentiable: bool = False
    term_names: tuple[str, ...] = ()
    term_weights: dict[str, float] | None = None
    robust_settings: bool = False

    def evaluate(self, x: torch.Tensor) -> RewardBatch:  # pragma: no cover - interface
        """x: (n, d) float tensor -> :class:`RewardBatch` of n rewards. A conditional reward declares
        ``evaluate(self, x, cond=None)``: ``cond`` the list of the n samples' condition values, or None."""
        raise NotImplementedError

    def __call__(self, x: torch.Tensor, cond: list[Any] | None = None) -> RewardBatch:
        return self.evaluate(x) if cond is None else self.evaluate(x, cond=cond)

    def describe(self, x: Any, valid: Any, cond: Any = None) -> dict[str, float]:
        """Optional task statistics of a bank's samples x (n, d) with mask valid (n,), e.g. diversity; ``cond``
        the list of the rows' condition values in a conditional run (else None, and not passed).

        The pipeline records them for the base and the fine-tuned bank (``summary.json["samples"]``,
        MLflow ``base.<key>`` / ``finetuned.<key>``). Default: none.
        """
        return {}

    def figures(self, out_dir: Any, base_x: Any, base_valid: Any, final_x: Any, final_valid: Any,
                base_cond: Any = None, final_cond: Any = None) -> list[Any]:
        """Optional task figures of the base against the fine-tuned samples, written into ``out_dir``;
        returns their paths (logged to MLflow). ``base_cond``/``final_cond``: the rows' condition values in a
        conditional run (passed only then). Default: none."""
        return []

    def value_kwargs(self) -> dict[str, Any] | None:
        """The constructor kwargs that change the reward's values, for its cache identity (with ``version``).

        None (the default): all of ``reward.kwargs``. A reward whose kwargs include settings that do not change
        values (timeouts, batching, workers) returns only the others (`rewards.simulator.Command`).
        """
        return None

    def evaluate_detailed(self, x: Any) -> Any:
        """A reward that handles its own failures returns a `rewards.robust.RobustResult` for x (n, d) float64.

        The default None lets the reward pool's generic robust evaluation call :meth:`evaluate` in chunks, with
        retries and bisection. `rewards.simulator.Command` overrides it (timeouts, process isolation).
        """
        return None

    def evaluate_with_grad(self, x: torch.Tensor, cond: list[Any] | None = None) -> tuple[RewardBatch, torch.Tensor]:
        """Rewards and their gradient d r / d x, shape (n, d); rows of invalid samples are zero. ``cond``: the
        samples' condition values (passed to ``evaluate`` only when given)."""
        if not self.differentiable:
            raise TypeError(f"reward {self.name!r} has no gradients (differentiable = False)")
        x = x.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            out = self.evaluate(x) if cond is None else self.evaluate(x, cond=cond)
            valid = out.valid & torch.isfinite(out.rewards)
            if bool(valid.any()):
                (grad,) = torch.autograd.grad(out.rewards[valid].sum(), x, allow_unused=True)
                grad = torch.zeros_like(x) if grad is None else grad
            else:
                grad = torch.zeros_like(x)
        grad = torch.where(valid[:, None], grad, torch.zeros_like(grad)).detach()
        batch = RewardBatch(out.rewards.detach(), valid, out.errors)
        return batch, grad


def source_version(fn: Callable[..., Any]) -> str:
    """A version string that changes when ``fn``'s code changes: a hash of its source (of its bytecode and
    constants when the source cannot be read). Plain functions have no ``version`` to bump, so the reward cache
    keys them by this instead: editing the function never reads values cached by the old one."""
    try:
        text = inspect.getsource(fn).encode()
    except (OSError, TypeError):
        code = getattr(fn, "__code__", None)
        text = repr((code.co_code, code.co_consts)).encode() if code is not None else repr(fn).encode()
    return "src-" + hashlib.sha256(text).hexdigest()[:16]


def _function_takes_cond(fn: Callable[..., Any]) -> bool:
    """True when ``fn`` has a parameter named ``cond``, or a second positional parameter without a default
    (``f(x, c)``; one with a default is a keyword setting, ``f(x, scale=1.0)``)."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required_second = len(positional) >= 2 and positional[1].default is inspect.Parameter.empty
    return required_second or any(p.name == "cond" for p in params)


def reward_takes_cond(reward: Reward) -> bool:
    """True when ``reward`` accepts the samples' conditions: a function ``f(x, cond)``, or a Reward whose
    ``evaluate`` has a ``cond`` parameter (or ``**kwargs``)."""
    if isinstance(reward, FunctionReward):
        return reward.takes_cond
    try:
        params = inspect.signature(reward.evaluate).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "cond" or p.kind is p.VAR_KEYWORD for p in params)


class FunctionReward(Reward):
    """Wraps ``f(x: Tensor (n, d), **kwargs) -> Tensor (n,)``, or ``f(x, cond, **kwargs)`` with ``cond`` the list
    of the samples' condition values (the signature is inspected once); non-finite outputs mark invalid samples.

    ``version`` is :func:`source_version` of ``f``, so the reward cache never serves values of an edited function.
    """

    differentiable = True

    def __init__(self, fn: Callable[..., torch.Tensor], name: str | None = None, **kwargs: Any):
        self.fn = fn
        self.kwargs = kwargs
        self.name = name or f"{fn.__module__}:{fn.__qualname__}"
        self.version = source_version(fn)
        self.takes_cond = _function_takes_cond(fn)

    def evaluate(self, x: torch.Tensor, cond: list[Any] | None = None) -> RewardBatch:
        if cond is not None and not self.takes_cond:
            raise TypeError(f"reward {self.name!r} takes no conditions (define it as f(x, cond))")
        out = self.fn(x, cond, **self.kwargs) if self.takes_cond else self.fn(x, **self.kwargs)
        if not isinstance(out, torch.Tensor):
            out = torch.as_tensor(out, dtype=torch.float64)
        out = out.reshape(-1)
        if out.shape[0] != x.shape[0]:
            raise ValueError(
                f"reward {self.name!r} returned {out.shape[0]} values for a batch of {x.shape[0]} samples"
            )
        valid = torch.isfinite(out.detach())
        errors = None if bool(valid.all()) else ["" if v else "nan" for v in valid.tolist()]
        return RewardBatch(out, valid, errors)


def import_object(path: str) -> Any:
    """Import ``package.module:attr`` (``attr`` may be dotted). Raises ValueError with the path."""
    if not isinstance(path, str) or ":" not in path:
        raise ValueError(f"import path {path!r} must look like 'package.module:Name'")
    module_name, _, attr = path.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or an error raised while importing the module
        raise ValueError(f"cannot import module {module_name!r} of {path!r}: {exc}") from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"module {module_name!r} has no attribute {attr!r} (import path {path!r})")
        obj = getattr(obj, part)
    return obj


def load_reward(target: str, kwargs: dict[str, Any] | None = None) -> Reward:
    """Build the reward named by ``target`` with ``kwargs``.

    A :class:`Reward` subclass is instantiated with the kwargs; a plain function is wrapped in
    :class:`FunctionReward` (kwargs passed on each call); a ready :class:`Reward` instance is returned.
    """
    kwargs = dict(kwargs or {})
    obj = import_object(target)
    if inspect.isclass(obj):
        if not issubclass(obj, Reward):
            raise ValueError(f"reward class {target!r} must subclass rewards.base.Reward")
        try:
            return obj(**kwargs)
        except TypeError as exc:
            raise ValueError(f"reward {target!r} rejected reward.kwargs {kwargs}: {exc}") from exc
        except (OSError, ImportError, RuntimeError, KeyError) as exc:  # missing files, packages, devices
            raise ValueError(f"reward {target!r} could not be built with reward.kwargs {kwargs}: "
                             f"{type(exc).__name__}: {exc}") from exc
    if isinstance(obj, Reward):
        if kwargs:
            raise ValueError(f"reward {target!r} is an instance; it takes no reward.kwargs")
        return obj
    if callable(obj):
        return FunctionReward(obj, name=target, **kwargs)
    raise ValueError(f"reward {target!r} is neither a Reward class nor a function")
