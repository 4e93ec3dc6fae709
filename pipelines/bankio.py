"""Bank storage: parquet shards committed atomically, consolidated into one file per bank.

A bank row is ``(id, x, reward, valid, error, attempts, seconds, cached)``: ``x`` is a fixed-size list of
d float64, ``reward`` is NaN when ``valid`` is false, ``error`` names the reason ('' when valid:
'timeout', 'crash', 'nan', 'malformed', 'exception'), ``attempts`` counts reward calls that involved the
sample, ``seconds`` is its share of reward wall time and ``cached`` says it came from the reward cache.
A reward that reports per-sample terms (`rewards.compose.WeightedSum`: each term's own value) adds one
float64 column ``term.<name>`` per term, NaN where that term failed; banks without terms have none, and
files written before terms existed read as banks without terms.
A screened bank (`pipelines.screening`) adds ``screen`` (float64, the cheap reward), ``evaluated`` (bool: the
expensive reward was called) and ``audited`` (bool: in the random audit); an unevaluated row keeps reward NaN
with ``valid`` True (it did not fail). Banks without screening have none of the three.
A conditional bank (``data.conditions``) adds ``cond`` (int64, the row's index into the list of condition
values) and records that list in the file's metadata (``tfft.conditions``, JSON); unconditional banks have
neither. Shards are written to a temporary name and renamed, so a reader never sees a partial shard.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

__all__ = ["Bank", "TERM_PREFIX", "bank_to_table", "table_to_bank", "write_atomic", "read_bank", "concat_banks"]

TERM_PREFIX = "term."
_CONDITIONS_KEY = b"tfft.conditions"


@dataclass(frozen=True)
class Bank:
    """Samples with rewards. Shapes: ids (n,), x (n, d); every other field (n,).

    ``terms``: name -> (n,) float64, the reward's per-sample terms (empty for most rewards).
    ``screen``, ``evaluated``, ``audited``: (n,) of a screened bank (module doc), else None; ``screening``: its
    accounting (`tfft.screen.ScreenResult.record` and the certified tail; kept beside the file, not in it).
    ``cond``: (n,) int64 condition indices of a conditional bank, else None; ``conditions``: the list of
    condition values they index (None without conditions).
    """

    ids: np.ndarray
    x: np.ndarray
    reward: np.ndarray
    valid: np.ndarray
    error: np.ndarray
    seconds: np.ndarray
    attempts: np.ndarray
    cached: np.ndarray
    terms: dict[str, np.ndarray] = field(default_factory=dict)
    screen: np.ndarray | None = None
    evaluated: np.ndarray | None = None
    audited: np.ndarray | None = None
    screening: dict[str, Any] | None = field(default=None, compare=False)
    cond: np.ndarray | None = None
    conditions: list[Any] | None = field(default=None, compare=False)

    @property
    def screened(self) -> bool:
        """True for a bank built by screened evaluation (it has an ``evaluated`` column)."""
        return self.evaluated is not None

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    @property
    def n_valid(self) -> int:
        return int(self.valid.sum())

    def accounting(self) -> dict[str, int]:
        """Totals for summaries: requested, valid, invalid per reason, cached, reward calls attempted."""
        return {
            "requested": len(self),
            "valid": self.n_valid,
            "invalid": len(self) - self.n_valid,
            "cached": int(self.cached.sum()),
            "attempts": int(self.attempts.sum()),
            **{f"invalid_{k}": v for k, v in self.failure_counts().items()},
            **({"unevaluated": int((~self.evaluated).sum())} if self.screened else {}),
        }

    def take(self, positions: np.ndarray | slice) -> Bank:
        """Rows ``positions`` (an index array or a slice), in that order, with every column (screen columns too);
        the screening record stays with the whole bank and is dropped."""
        columns = {f: None if (v := getattr(self, f)) is None else v[positions]
                   for f in self.__dataclass_fields__ if f not in ("terms", "screening", "conditions")}
        return Bank(**columns, terms={k: v[positions] for k, v in self.terms.items()}, conditions=self.conditions)

    def of_condition(self, index: int) -> Bank:
        """The rows of condition ``index`` (a conditional bank only)."""
        if self.cond is None:
            raise ValueError("the bank has no condition column")
        return self.take(np.flatnonzero(self.cond == index))

    def scored(self, invalid_reward: float | None) -> tuple[np.ndarray, np.ndarray]:
        """(reward (n,), mask (n,)) under ``objective.invalid_reward`` (`tfft.invalid.assign_invalid`): None
        keeps the bank's own mask; a number is the reward of every invalid sample, and the mask is all True."""
        from tfft.invalid import assign_invalid

        reward, valid, _ = assign_invalid(self.reward, self.valid, invalid_reward)
        return reward, valid

    def failure_counts(self) -> dict[str, int]:
        """Invalid samples per reason."""
        reasons, counts = np.unique(self.error[~self.valid], return_counts=True)
        return {str(r) or "unknown": int(c) for r, c in zip(reasons, counts)}


_SCREEN_COLUMNS = {"screen": np.float64, "evaluated": bool, "audited": bool}


def bank_to_table(bank: Bank) -> pa.Table:
    d = bank.x.shape[1]
    flat = pa.array(np.ascontiguousarray(bank.x, dtype=np.float64).reshape(-1))
    terms = {TERM_PREFIX + name: pa.array(np.asarray(v, dtype=np.float64)) for name, v in bank.terms.items()}
    table = pa.table(
        {
            "id": pa.array(bank.ids.astype(np.int64)),
            "x": pa.FixedSizeListArray.from_arrays(flat, d),
            "reward": pa.array(bank.reward.astype(np.float64)),
            "valid": pa.array(bank.valid.astype(bool)),
            "error": pa.array([str(e) for e in bank.error], type=pa.string()),
            "seconds": pa.array(bank.seconds.astype(np.float64)),
            "attempts": pa.array(bank.attempts.astype(np.int32)),
            "cached": pa.array(bank.cached.astype(bool)),
            **terms,
            **{name: pa.array(np.asarray(getattr(bank, name)).astype(kind))
               for name, kind in _SCREEN_COLUMNS.items() if getattr(bank, name) is not None},
            **({} if bank.cond is None else {"cond": pa.array(np.asarray(bank.cond).astype(np.int64))}),
        }
    )
    if bank.conditions is not None:
        table = table.replace_schema_metadata({_CONDITIONS_KEY: json.dumps(list(bank.conditions)).encode()})
    return table


def table_to_bank(table: pa.Table) -> Bank:
    x_col = table.column("x").combine_chunks()
    d = x_col.type.list_size
    x = x_col.flatten().to_numpy(zero_copy_only=False).reshape(-1, d)
    metadata = table.schema.metadata or {}
    conditions = json.loads(metadata[_CONDITIONS_KEY]) if _CONDITIONS_KEY in metadata else None
    return Bank(
        ids=table.column("id").to_numpy(),
        x=x,
        reward=table.column("reward").to_numpy(zero_copy_only=False).astype(np.float64),
        valid=table.column("valid").to_numpy(zero_copy_only=False).astype(bool),
        error=np.asarray(table.column("error").to_pylist(), dtype=object),
        seconds=table.column("seconds").to_numpy(zero_copy_only=False).astype(np.float64),
        attempts=table.column("attempts").to_numpy(zero_copy_only=False).astype(np.int64),
        cached=table.column("cached").to_numpy(zero_copy_only=False).astype(bool),
        terms={
            name[len(TERM_PREFIX):]: table.column(name).to_numpy(zero_copy_only=False).astype(np.float64)
            for name in table.column_names
            if name.startswith(TERM_PREFIX)
        },
        **{name: table.column(name).to_numpy(zero_copy_only=False).astype(kind)
           for name, kind in _SCREEN_COLUMNS.items() if name in table.column_names},
        cond=table.column("cond").to_numpy(zero_copy_only=False).astype(np.int64) if "cond" in table.column_names else None,
        conditions=conditions,
    )


def write_atomic(bank: Bank, path: str | Path) -> None:
    """Write ``bank`` to ``path`` so that the file appears complete or not at all."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    pq.write_table(bank_to_table(bank), tmp)
    os.replace(tmp, path)


def read_bank(path: str | Path) -> Bank:
    return table_to_bank(pq.read_table(path))


def concat_banks(banks: list[Bank]) -> Bank:
    """Concatenate banks and sort by id. Terms: the union of the banks' names (in order of appearance), NaN
    in the rows of a bank without that term."""
    if not banks:
        raise ValueError("no banks to concatenate")
    plain = [f for f in Bank.__dataclass_fields__
             if f not in ("terms", "screening", "cond", "conditions") and f not in _SCREEN_COLUMNS]
    cat = {f: np.concatenate([getattr(b, f) for b in banks]) for f in plain}
    for name, kind in _SCREEN_COLUMNS.items():  # a screened column: absent rows take NaN / True / False
        if any(getattr(b, name) is not None for b in banks):
            fill = {"screen": np.nan, "evaluated": True, "audited": False}[name]
            cat[name] = np.concatenate([np.full(len(b), fill, dtype=kind) if getattr(b, name) is None
                                        else np.asarray(getattr(b, name)).astype(kind) for b in banks])
    conds = [b.cond for b in banks]
    if any(c is not None for c in conds):
        if any(c is None for c in conds):
            raise ValueError("cannot concatenate conditional and unconditional banks")
        cat["cond"] = np.concatenate(conds).astype(np.int64)
    conditions = next((b.conditions for b in banks if b.conditions is not None), None)
    order = np.argsort(cat["ids"], kind="stable")
    names = list(dict.fromkeys(name for b in banks for name in b.terms))
    terms = {
        name: np.concatenate([np.asarray(b.terms.get(name, np.full(len(b), np.nan)), dtype=np.float64) for b in banks])[order]
        for name in names
    }
    return Bank(**{k: v[order] for k, v in cat.items()}, terms=terms, conditions=conditions)
