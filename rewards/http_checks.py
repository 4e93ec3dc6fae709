"""Checks of :class:`rewards.http.Endpoint`'s kwargs: each returns the value to keep or raises ValueError.

The messages name the kwarg and the value given (``Endpoint: <name> must be ..., got <value>``).
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

__all__ = ["ENV_NAME", "check_url", "check_token_env"]

ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


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
