"""A persistent reward cache keyed by the content of a sample and the identity of the reward.

Layout: ``<dir>/<identity>/part-<writer>-<n>.parquet``. ``identity`` hashes the reward's import path,
kwargs and version string, so a changed reward never reads stale values. Each writer (a reward actor)
only ever creates new files under a unique name, written to a temporary name and renamed, so any number
of concurrent writers, on one machine or on a shared file system, never conflict and a reader never sees
a partial file. Readers load every part. Valid rewards and deterministic failures ('nan') are cached;
transient failures (timeouts, crashes) are not, so they are tried again on a rerun.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

__all__ = ["reward_identity", "sample_keys", "RewardCache", "CACHEABLE_ERRORS"]

CACHEABLE_ERRORS = ("", "nan")


def reward_identity(target: str, kwargs: dict[str, Any], version: str) -> str:
    """Hash of (import path, kwargs, version): the cache namespace of a reward."""
    payload = json.dumps({"target": target, "kwargs": kwargs, "version": str(version)}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def sample_keys(x: np.ndarray) -> list[bytes]:
    """One 16-byte key per row of x (n, d), from the row's float64 bytes."""
    x = np.ascontiguousarray(x, dtype=np.float64)
    return [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in x]


class RewardCache:
    """Lookup and append for one reward identity under ``root``."""

    def __init__(self, root: str | os.PathLike[str], identity: str):
        self.dir = Path(os.path.expanduser(str(root))) / identity
        self.writer = uuid.uuid4().hex[:12]
        self._count = 0
        self._index: dict[bytes, tuple[float, bool, str]] = {}
        self._parts: set[str] = set()
        self.reload()

    def reload(self) -> None:
        """Read the committed parts not read yet (temporary files start with '.' and are skipped)."""
        if not self.dir.is_dir():
            return
        for part in sorted(self.dir.glob("part-*.parquet")):
            if part.name in self._parts:
                continue
            self._parts.add(part.name)
            try:
                table = pq.read_table(part)
            except Exception:  # an unreadable part is ignored, never fatal
                continue
            keys = table.column("key").to_pylist()
            rewards = table.column("reward").to_pylist()
            valid = table.column("valid").to_pylist()
            errors = table.column("error").to_pylist()
            for k, r, v, e in zip(keys, rewards, valid, errors):
                self._index[k] = (float("nan") if r is None else float(r), bool(v), str(e))

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

    def add(self, keys: list[bytes], reward: np.ndarray, valid: np.ndarray, error: np.ndarray) -> int:
        """Commit the cacheable entries as one new part; returns how many were written."""
        keep = [i for i, e in enumerate(error) if str(e) in CACHEABLE_ERRORS and keys[i] not in self._index]
        if not keep:
            return 0
        table = pa.table(
            {
                "key": pa.array([keys[i] for i in keep], type=pa.binary(16)),
                "reward": pa.array([float(reward[i]) for i in keep], type=pa.float64()),
                "valid": pa.array([bool(valid[i]) for i in keep]),
                "error": pa.array([str(error[i]) for i in keep]),
            }
        )
        self.dir.mkdir(parents=True, exist_ok=True)
        self._count += 1
        name = f"part-{self.writer}-{self._count:06d}.parquet"
        tmp = self.dir / f".{name}.tmp"
        pq.write_table(table, tmp)
        os.replace(tmp, self.dir / name)
        self._parts.add(name)
        for i in keep:
            self._index[keys[i]] = (float(reward[i]), bool(valid[i]), str(error[i]))
        return len(keep)
