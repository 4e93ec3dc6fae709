"""Checks of :class:`rewards.http.Endpoint`'s kwargs: each returns the value to keep or raises ValueError.

The messages name the kwarg and the value given (``Endpoint: <name> must be ..., got <value>``).
"""

from __future__ import annotations

import math
import re
from typing import Any
from urllib.parse import urlsplit

import numpy as np

__all__ = ["ENV_NAME", "as_int", "as_float", "check_url", "check_token_env"]

ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def as_int(name: str, value: Any, low: int) -> int:
    """``value`` as an int when it is an integer (not a bool) >= ``low``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"Endpoint: {name} must be an integer >= {low}, got {value!r}")
    return int(value)


def as_float(name: str, value: Any, positive: bool) -> float:
    """``value`` as a float when it is a finite number (not a bool) >= 0, or > 0 with ``positive``."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (positive and value == 0):
        bound = "> 0" if positive else ">= 0"
        raise ValueError(f"Endpoint: {name} must be a finite number {bound}, got {value!r}")
    return float(value)


def check_url(url: Any) -> str:
    """``url`` when it is an http:// or https:// URL with a host and without credentials."""
    parts = urlsplit(url) if isinstance(url, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"Endpoint: url must be an http:// or https:// URL with a host, got {url!r}")
    if parts.username is not None or parts.password is not None:
        raise ValueError("Endpoint: url must not hold credentials (user:password@); use token_env for a token")
    return url


def check_token_env(token_env: Any) -> str:
    """``token_env`` when it is '' or the name of an environment variable; None is ''."""
    if token_env is None:
        token_env = ""
    if not isinstance(token_env, str) or (token_env and not ENV_NAME.match(token_env)):
        raise ValueError(f"Endpoint: token_env must be the name of an environment variable or '', got {token_env!r}")
    return token_env
