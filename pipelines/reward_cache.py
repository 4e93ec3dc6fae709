"""A persistent reward cache keyed by the content of a sample and the identity of the reward.

Layout: ``<dir>/<identity>/part-<writer>-<n>.parquet``. ``identity`` hashes the reward's import path,
kwargs and version string, so a changed reward never reads stale values. Each writer (a reward actor)
only ever creates new files under a unique name, published atomically (`pipelines.storage.Store`: on disk a
temporary name and a rename, on an object store one PUT), so any number of concurrent writers, on one machine,
on a shared file system or on an object store (``s3://``, ``gs://``), never conflict and a reader never sees
a partial file. Readers load every part. Valid rewards and deterministic failures ('nan') are cached;
transient failures (timeouts, crashes) are not, so they are tried again on a rerun.

A reward's per-sample terms (`rewards.compose.WeightedSum`) are cached with its reward, as float64 columns
``term.<name>`` of the same part: a cache hit brings back its terms too (:meth:`RewardCache.lookup_terms`).
A term a part does not hold reads as NaN.

With conditions (``data.conditions``) a reward's value depends on the sample's condition too: the key hashes the
sample's bytes and the condition value's JSON text (:func:`sample_keys` with ``cond``), so the same x under two
conditions never shares an entry; without conditions the keys are what they always were.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.storage import Store

__all__ = ["reward_identity", "sample_keys", "RewardCache", "CACHEABLE_ERRORS"]

CACHEABLE_ERRORS = ("", "nan")
_TERM = "term."


def reward_identity(target: str, kwargs: dict[str, Any], version: str) -> str:
    """Hash of (import path, kwargs, version): the cache namespace of a reward."""
    payload = json.dumps({"target": target, "kwargs": kwargs, "version": str(version)}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def sample_keys(x: np.ndarray, cond: Sequence[Any] | None = None) -> list[bytes]:
    """One 16-byte key per row of x (n, d), from the row's float64 bytes; with ``cond`` (n condition values)
    also from the row's condition (its JSON text), so a conditional reward's entries are per condition."""
    x = np.ascontiguousarray(x, dtype=np.float64)
    if cond is None:
        return [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in x]
    if len(cond) != len(x):
        raise ValueError(f"cond must hold one value per row: {len(cond)} for {len(x)} rows")
    return [hashlib.blake2b(row.tobytes() + b"\x00cond:" + json.dumps(c).encode(), digest_size=16).digest()
            for row, c in zip(x, cond)]


class RewardCache:
    """Lookup and append for one reward identity under ``root``."""

    def __init__(self, root: str | os.PathLike[str], identity: str):
        self.store = Store(str(root)).child(identity)
        self.writer = uuid.uuid4().hex[:12]
        self._count = 0
        self._index: dict[bytes, tuple[float, bool, str]] = {}
        self._terms: dict[bytes, dict[str, float]] = {}  # only the entries that came with terms
        self._parts: set[str] = set()
        self.reload()

    def reload(self) -> None:
        """Read the committed parts not read yet (temporary files start with '.' and are skipped)."""
        names = [n for n in self.store.files() if "/" not in n and n.startswith("part-") and n.endswith(".parquet")]
        for name in sorted(names):
            if name in self._parts:
                continue
            self._parts.add(name)
            try:
                table = pq.read_table(pa.BufferReader(self.store.read_bytes(name)))
            except Exception:  # an unreadable part is ignored, never fatal
                continue
            keys = table.column("key").to_pylist()
            rewards = table.column("reward").to_pylist()
            valid = table.column("valid").to_pylist()
            errors = table.column("error").to_pylist()
            for k, r, v, e in zip(keys, rewards, valid, errors):
                self._index[k] = (float("nan") if r is None else float(r), bool(v), str(e))
            names = [c for c in table.column_names if c.startswith(_TERM)]
            if names:
                columns = {c[len(_TERM):]: table.column(c).to_pylist() for c in names}
                for i, k in enumerate(keys):
                    self._terms[k] = {t: float("nan") if col[i] is None else float(col[i]) for t, col in columns.items()}

    def __len__(self) -> int:
        return len(self._index)

    def lookup(self, keys: list[bytes]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(hit (n,) bool, reward (n,), valid (n,), error (n,) object) for each key.

        On a miss, parts committed since the last read (by other actors, e.g. one that died after
        scoring a batch that is now retried here) are read first."""
        if any(k not in self._index for k in keys):
            self.reload()
        n = len(keys)
        hit = np.zeros(n, dtype=bool)
        reward = np.full(n, np.nan)
        valid = np.zeros(n, dtype=bool)
        error = np.full(n, "", dtype=object)
        for i, k in enumerate(keys):
            entry = self._index.get(k)
            if entry is not None:
                hit[i] = True
                reward[i], valid[i], error[i] = entry
        return hit, reward, valid, error

    def lookup_terms(self, keys: list[bytes], names: Sequence[str]) -> dict[str, np.ndarray]:
        """name -> (n,) float64: the cached value of each term for each key (NaN on a miss or a term not
        stored). Call it after :meth:`lookup` (which reads new parts on a miss)."""
        out = {name: np.full(len(keys), np.nan) for name in names}
        for i, k in enumerate(keys):
            entry = self._terms.get(k)
            if entry is not None:
                for name in names:
                    out[name][i] = entry.get(name, np.nan)
        return out

    def add(
        self,
        keys: list[bytes],
        reward: np.ndarray,
        valid: np.ndarray,
        error: np.ndarray,
        terms: Mapping[str, np.ndarray] | None = None,
    ) -> int:
        """Commit the cacheable entries as one new part; returns how many were written.

        ``terms``: name -> (n,) float64 per-sample terms of the reward, stored with each entry."""
        keep = [i for i, e in enumerate(error) if str(e) in CACHEABLE_ERRORS and keys[i] not in self._index]
        if not keep:
            return 0
        terms = {name: np.asarray(v, dtype=np.float64) for name, v in (terms or {}).items()}
        table = pa.table(
            {
                "key": pa.array([keys[i] for i in keep], type=pa.binary(16)),
                "reward": pa.array([float(reward[i]) for i in keep], type=pa.float64()),
                "valid": pa.array([bool(valid[i]) for i in keep]),
                "error": pa.array([str(error[i]) for i in keep]),
                **{_TERM + name: pa.array(v[keep], type=pa.float64()) for name, v in terms.items()},
            }
        )
        self._count += 1
        name = f"part-{self.writer}-{self._count:06d}.parquet"
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        self.store.write_bytes(name, sink.getvalue().to_pybytes())
        self._parts.add(name)
        for i in keep:
            self._index[keys[i]] = (float(reward[i]), bool(valid[i]), str(error[i]))
            if terms:
                self._terms[keys[i]] = {name: float(v[i]) for name, v in terms.items()}
        return len(keep)
