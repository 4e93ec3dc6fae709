"""Load, merge and validate configuration before anything expensive starts.

``load_config(path, overrides)`` merges the schema defaults, a YAML file and ``key=value`` overrides,
then `pipelines.validation.validate` checks values and import paths. Every problem raises :class:`ConfigError` with
one line naming the offending key; the CLI turns it into exit code 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipelines.schema import Config

__all__ = ["ConfigError", "require", "explain", "load_config", "to_yaml", "to_flat_dict", "flatten", "from_dict"]


class ConfigError(ValueError):
    """A configuration problem; the message names the key."""


def require(ok: bool, key: str, message: str) -> None:
    """Raise ``ConfigError("'key' message")`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"'{key}' {message}")


def explain(exc: OmegaConfBaseException) -> str:
    """One line for an OmegaConf merge error, naming the key: unknown, or a bad value."""
    key = getattr(exc, "full_key", None) or ""
    msg = str(exc).splitlines()[0]
    if "not in" in msg or "Key '" in msg and "not" in msg:
        return f"unknown config key '{key}'" if key else msg
    return f"bad value for '{key}': {msg}" if key else msg


def _merge(sources: Sequence[Any]) -> Config:
    base = OmegaConf.structured(Config)
    try:
        merged = OmegaConf.merge(base, *sources)
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as exc:
        raise ConfigError(explain(exc)) from None
    except (TypeError, ValueError) as exc:  # e.g. a dotted override into a list item: 'terms.1.weight=0.5'
        raise ConfigError(
            f"cannot merge the config sources: {exc}; an override cannot reach into a list item "
            "(replace the whole list, e.g. key='[...]')"
        ) from None


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Schema defaults <- YAML file at ``path`` <- ``key=value`` overrides; validated."""
    sources: list[Any] = []
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file '{path}' does not exist")
        try:
            sources.append(OmegaConf.load(p))
        except Exception as exc:
            raise ConfigError(f"cannot parse config file '{path}': {exc}") from None
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key=value")
        key = item.split("=", 1)[0].strip()
        if not key:
            raise ConfigError(f"override '{item}' has no key")
    if overrides:
        try:
            sources.append(OmegaConf.from_dotlist(list(overrides)))
        except OmegaConfBaseException as exc:
            raise ConfigError(explain(exc)) from None
    cfg = _merge(sources)
    from pipelines.validation import validate  # it raises this module's ConfigError

    validate(cfg)
    return cfg


def from_dict(values: dict[str, Any]) -> Config:
    """A Config from a plain nested dict (e.g. a saved ``config.yaml``), validated."""
    cfg = _merge([OmegaConf.create(values)])
    from pipelines.validation import validate

    validate(cfg)
    return cfg


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML text."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_flat_dict(cfg: Config) -> dict[str, Any]:
    """``{"objective.alpha": 0.1, ...}``: the resolved config flattened (for MLflow params)."""
    return flatten(OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True))


def flatten(tree: dict[str, Any]) -> dict[str, Any]:
    """Nested dicts as ``{"a.b": leaf}``; an empty nested dict is the leaf ``"{}"``."""
    out: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            if not node and prefix:
                out[prefix] = "{}"
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            out[prefix] = node

    walk("", tree)
    return out
