"""A local working copy of a directory on an object store: pulled before a run, pushed while and after it runs.

``tfft run CONFIG --out s3://bucket/runs/a`` (and ``tfft bank``, and ``pretrain.cache_dir`` on a store) works in a
local directory ``<mirror root>/<hash of the URI>`` (``TFFT_MIRROR_DIR``, default ``~/.cache/tfft/mirror``): every
stage reads and writes local files, as with a local ``--out``, and :class:`Mirror`

- pulls the store's files first (so that a rerun, on this machine or another, resumes from what the store holds);
- pushes every committed file that is new or changed since the last push, every ``interval_s`` seconds while the
  run goes on (a background thread; ``TFFT_MIRROR_PUSH_S``, default 30), and once more when it ends, also when
  it fails.

Each file is uploaded whole, after the stage that wrote it committed it under its final name (the pipeline writes
to a temporary name starting with '.' and renames; such names are never pushed), and one PUT publishes an object
atomically: the store holds only complete files, and a run killed at any moment leaves the store at the state of
its last push, which the rerun pulls and resumes from. Files deleted locally are not deleted on the store.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType

from pipelines.storage import Store, is_remote

__all__ = ["Mirror", "mirror_dir", "working_dir", "remote_of"]

_ACTIVE: dict[Path, str] = {}  # local copy -> store URI, while a Mirror is entered


def mirror_dir(uri: str) -> Path:
    """The local working copy of ``uri``: ``$TFFT_MIRROR_DIR`` (default ``~/.cache/tfft/mirror``) / hash."""
    root = Path(os.path.expanduser(os.environ.get("TFFT_MIRROR_DIR", "~/.cache/tfft/mirror")))
    return root / hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:16]


class Mirror:
    """The local copy ``local`` of the store directory ``uri`` (use as a context manager: pull on enter, push
    periodically and on exit).

    Args:
        uri: the store directory (``s3://...``, ``gs://...``).
        local: the working copy (default :func:`mirror_dir`).
        interval_s: seconds between background pushes (0: push only on exit).
        log: progress lines (files and bytes moved; never credentials).
    """

    def __init__(self, uri: str, local: Path | None = None, *, interval_s: float = 30.0,
                 log: Callable[[str], None] = print) -> None:
        self.store = Store(uri)
        self.local = Path(local) if local is not None else mirror_dir(uri)
        self.interval_s = interval_s
        self.log = log
        self._pushed: dict[str, tuple[int, int]] = {}  # relative path -> (size, mtime_ns) of the last upload
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def pull(self) -> int:
        """Download the store's files that the local copy lacks or holds with another size; returns how many."""
        self.local.mkdir(parents=True, exist_ok=True)
        local = Store(str(self.local))
        count = 0
        for rel, size in sorted(self.store.files().items()):
            path = self.local / rel
            if not (path.is_file() and path.stat().st_size == size):
                local.write_bytes(rel, self.store.read_bytes(rel))
                count += 1
            stat = path.stat()
            self._pushed[rel] = (stat.st_size, stat.st_mtime_ns)
        if count:
            self.log(f"[storage] pulled {count} file(s) from {self.store.location}")
        return count

    def push(self) -> int:
        """Upload the committed local files that are new or changed since the last push; returns how many."""
        with self._lock:
            count = 0
            for rel in sorted(Store(str(self.local)).files()):
                path = self.local / rel
                try:
                    stat = path.stat()
                    if self._pushed.get(rel) == (stat.st_size, stat.st_mtime_ns):
                        continue
                    data = path.read_bytes()
                except FileNotFoundError:  # replaced or removed while we looked: the next push gets it
                    continue
                self.store.write_bytes(rel, data)
                self._pushed[rel] = (stat.st_size, stat.st_mtime_ns)
                count += 1
            return count

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.push()
            except Exception as error:  # noqa: BLE001 - a failed background push is retried at the next one
                self.log(f"[storage] push to {self.store.location} failed, retrying later: {error}")

    def __enter__(self) -> Path:
        self.pull()
        _ACTIVE[self.local.resolve()] = self.store.location
        if self.interval_s > 0:
            self._thread = threading.Thread(target=self._loop, name="tfft-mirror-push", daemon=True)
            self._thread.start()
        return self.local

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        _ACTIVE.pop(self.local.resolve(), None)
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        count = self.push()
        self.log(f"[storage] pushed {count} file(s) to {self.store.location}")


@contextmanager
def working_dir(out: str | os.PathLike[str], *, log: Callable[[str], None] = print,
                interval_s: float | None = None) -> Iterator[Path]:
    """The directory a command works in for ``--out``: the path itself when local, else a :class:`Mirror` of the
    store directory (pulled first, pushed every ``interval_s`` seconds, default ``$TFFT_MIRROR_PUSH_S`` or 30,
    and at the end)."""
    if not is_remote(str(out)):
        yield Path(out)
        return
    if interval_s is None:
        interval_s = float(os.environ.get("TFFT_MIRROR_PUSH_S", "30"))
    with Mirror(str(out), interval_s=interval_s, log=log) as local:
        yield local


def remote_of(local: str | os.PathLike[str]) -> str | None:
    """The store URI of ``local`` when it is (inside) the working copy of an entered :class:`Mirror`, else None:
    what a stage passes to writers on other nodes (Ray Train's checkpoints), which cannot see the local copy."""
    path = Path(local).resolve()
    for root, uri in _ACTIVE.items():
        if path == root or root in path.parents:
            rel = path.relative_to(root).as_posix()
            return uri.rstrip("/") + ("" if rel == "." else f"/{rel}")
    return None
