"""Directories on local disk or on an object store (``s3://bucket/prefix``, ``gs://bucket/prefix``), one interface.

A :class:`Store` is a directory: list, read and write whole files by name. Writes are published atomically on
both kinds: on local disk a file is written under a temporary name (starting with '.') and renamed; on an object
store one PUT publishes the object whole (a reader sees the old object, or none, or the new one, never a partial
one), and no rename is needed. That is all the pipeline's persistent outputs need: every file is written once,
whole, under its final name (bank shards, reward-cache parts, checkpoints, summaries).

Credentials and endpoints come from the store's standard environment, never from the config, and are never
logged:
- S3 (and S3-compatible stores): ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY`` (or any source of the AWS SDK's
  default chain), ``AWS_DEFAULT_REGION`` (or ``AWS_REGION``), ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``) for
  an on-premises or test endpoint such as ``http://minio:9000``.
- GCS: Google's application-default credentials (``GOOGLE_APPLICATION_CREDENTIALS``).
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

__all__ = ["SCHEMES", "StorageError", "Store", "is_remote", "check_writable", "check_stores", "ray_storage"]

SCHEMES = ("s3", "gs", "gcs")


class StorageError(RuntimeError):
    """A store that cannot be reached, read or written; the message names the URI and what to set."""


def is_remote(location: str | os.PathLike[str] | None) -> bool:
    """True for ``s3://``, ``gs://`` and ``gcs://`` URIs; local paths (and ``file://``) are not remote."""
    if location is None:
        return False
    text = str(location)
    return "://" in text and text.split("://", 1)[0].lower() in SCHEMES


def _filesystem(uri: str):  # -> (pyarrow.fs.FileSystem, path inside it)
    import pyarrow.fs as pafs

    scheme, rest = uri.split("://", 1)
    scheme = scheme.lower()
    rest = rest.strip("/")
    if not rest:
        raise StorageError(f"{uri!r} names no bucket")
    if scheme == "s3":
        kwargs: dict = {"connect_timeout": 5.0, "request_timeout": 60.0,
                        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=3)}
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
            kwargs["endpoint_override"] = parsed.netloc
            kwargs["scheme"] = parsed.scheme
        region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
        if region:
            kwargs["region"] = region
        return pafs.S3FileSystem(**kwargs), rest
    return pafs.GcsFileSystem(), rest


@dataclass(frozen=True)
class Store:
    """A directory: ``location`` is a local path (``~`` expanded) or an ``s3://`` / ``gs://`` URI."""

    location: str

    @property
    def remote(self) -> bool:
        return is_remote(self.location)

    def child(self, *names: str) -> "Store":
        """The sub-directory ``names`` (nothing is created)."""
        if self.remote:
            return Store("/".join([self.location.rstrip("/"), *names]))
        return Store(str(Path(os.path.expanduser(self.location)).joinpath(*names)))

    def _local(self, name: str = "") -> Path:
        base = Path(os.path.expanduser(self.location))
        return base / name if name else base

    def _remote(self, name: str = "") -> tuple[object, str]:
        fs, path = _filesystem(self.location)
        return fs, f"{path}/{name}" if name else path

    def _fail(self, action: str, error: Exception) -> StorageError:
        hint = (" (set AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION, and AWS_ENDPOINT_URL for an "
                "S3-compatible store)" if self.location.lower().startswith("s3://") else "")
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return StorageError(f"cannot {action} {self.location!r}: {first}{hint}")

    def files(self) -> dict[str, int]:
        """Every committed file below this directory: relative path ('/'-separated) -> size in bytes. Names
        starting with '.' (temporary files) are left out. A missing directory has no files."""
        if not self.remote:
            root = self._local()
            if not root.is_dir():
                return {}
            out = {}
            for path in root.rglob("*"):
                rel = path.relative_to(root)
                if path.is_file() and not any(part.startswith(".") for part in rel.parts):
                    out[rel.as_posix()] = path.stat().st_size
            return out
        import pyarrow.fs as pafs

        fs, base = self._remote()
        try:
            infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
        except Exception as error:  # noqa: BLE001 - one clear line instead of the SDK's
            raise self._fail("list", error) from None
        out = {}
        for info in infos:
            if info.type == pafs.FileType.File:
                rel = info.path[len(base):].lstrip("/")
                if not any(part.startswith(".") for part in rel.split("/")):
                    out[rel] = int(info.size)
        return out

    def exists(self, name: str) -> bool:
        """Whether the file ``name`` exists."""
        if not self.remote:
            return self._local(name).is_file()
        import pyarrow.fs as pafs

        fs, path = self._remote(name)
        try:
            return fs.get_file_info(path).type == pafs.FileType.File
        except Exception as error:  # noqa: BLE001
            raise self._fail(f"look for {name!r} in", error) from None

    def path_of(self, name: str) -> str:
        """The location of the file ``name`` (a local path or a URI), for messages and records."""
        return self.child(name).location

    def read_bytes(self, name: str) -> bytes:
        """The whole file ``name`` (relative, '/'-separated)."""
        if not self.remote:
            return self._local(name).read_bytes()
        fs, path = self._remote(name)
        try:
            with fs.open_input_stream(path) as stream:
                return stream.read()
        except FileNotFoundError:
            raise
        except Exception as error:  # noqa: BLE001
            raise self._fail(f"read {name!r} from", error) from None

    def write_bytes(self, name: str, data: bytes) -> None:
        """Publish ``data`` as the file ``name`` atomically (a reader never sees part of it)."""
        if not self.remote:
            path = self._local(name)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"
            tmp.write_bytes(data)
            os.replace(tmp, path)
            return
        fs, path = self._remote(name)
        try:
            with fs.open_output_stream(path) as stream:
                stream.write(data)
        except Exception as error:  # noqa: BLE001
            raise self._fail(f"write {name!r} to", error) from None

    def delete(self, name: str) -> None:
        """Remove the file ``name`` if it exists."""
        if not self.remote:
            self._local(name).unlink(missing_ok=True)
            return
        fs, path = self._remote(name)
        try:
            fs.delete_file(path)
        except FileNotFoundError:
            pass
        except Exception as error:  # noqa: BLE001
            raise self._fail(f"delete {name!r} from", error) from None


def check_writable(location: str, setting: str) -> None:
    """Write and delete a small probe file under ``location``; a :class:`StorageError` naming ``setting`` and the
    URI when the store cannot be reached or refuses (before any expensive work)."""
    store = Store(location)
    probe = f".tfft-probe-{uuid.uuid4().hex[:12]}"
    try:
        store.write_bytes(probe, b"probe")
        store.delete(probe)
    except StorageError as error:
        raise StorageError(f"'{setting}': {error}") from None
    except OSError as error:
        raise StorageError(f"'{setting}': cannot write to {location!r}: {error}") from None


def check_stores(locations: dict[str, str | None]) -> None:
    """`check_writable` for every remote location among ``{setting: location}`` (local ones are checked where they
    are created)."""
    for setting, location in locations.items():
        if location and is_remote(location):
            check_writable(location, setting)


def ray_storage(location: str) -> tuple[object | None, str]:
    """(``storage_filesystem``, ``storage_path``) for Ray's ``RunConfig``: (None, the path) for a local path, the
    store's ``pyarrow.fs`` filesystem (endpoint and region from the environment, as every tfft store) and the
    path inside it for a URI."""
    if not is_remote(location):
        return None, location
    return _filesystem(location)
