"""The base stage: the reward attached (served or not) and the base model's bank ``out/bank_base.parquet``.

The bank holds ``bank.size`` samples per condition (``bank.size`` in all without conditions), scored by the
reward, with its screen when ``reward.screen`` is set; an interrupted bank resumes from its shards.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from pipelines.bankio import Bank
from pipelines.conditions import condition_count
from pipelines.pretrain import BaseModel, load_or_pretrain
from pipelines.raysession import connect
from pipelines.schema import Config
from pipelines.screening import bank_for
from pipelines.serving import attach, detach
from pipelines.stage_record import StageRecord

__all__ = ["BaseStage", "prepare_base", "attach_reward", "served_reward"]


@dataclass(frozen=True)
class BaseStage:
    """The pretrained base model and its bank (samples flattened to (N, d), rewards, validity); ``record``: what
    the bank stage did (`pipelines.bank.build_bank`; the pretraining's record is ``model.stage``)."""

    model: BaseModel
    bank: Bank
    record: StageRecord


def attach_reward(cfg: Config, log: Callable[[str], None]) -> tuple[Config, bool]:
    """With ``reward.serve.enabled``: Ray up, the reward's Serve application running, the config pointing at it
    (`pipelines.serving.attach`). Otherwise the config as it is. Returns (config, whether this call started the
    application)."""
    if not cfg.reward.serve.enabled:
        return cfg, False
    connect(cfg.ray, log=log)
    return attach(cfg, log=log)


@contextmanager
def served_reward(cfg: Config, log: Callable[[str], None]) -> Iterator[Config]:
    """:func:`attach_reward` for the block: yields the config to run with, and deletes an application it
    started on the way out (`pipelines.serving.detach`)."""
    served, started = attach_reward(cfg, log)
    try:
        yield served
    finally:
        detach(served, started, log=log)


def prepare_base(
    cfg: Config, out: Path, *, log: Callable[[str], None] = print, model: BaseModel | None = None
) -> BaseStage:
    """The pretrained base model (cached; ``model`` when given) and its bank ``out/bank_base.parquet``
    (resumable). Raises RuntimeError when fewer than 2 samples are valid: the threshold needs 2."""
    model = model if model is not None else load_or_pretrain(cfg, log=log)
    connect(cfg.ray, log=log)
    bank, record = bank_for(
        cfg, (model.config, model.state_dict), size=cfg.bank.size * condition_count(cfg), label="base",
        out_path=out / "bank_base.parquet", tilted=True, log=log,
    )
    if bank.n_valid < 2:
        raise RuntimeError(f"the base bank has {bank.n_valid} valid samples; the threshold needs at least 2")
    return BaseStage(model, bank, record)
