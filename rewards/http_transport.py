"""The HTTP transport of :class:`rewards.http.Endpoint`: sessions, answer bodies read against a deadline, excerpts.

- :func:`session_for`: a ``requests.Session`` with the environment's proxy and CA-bundle settings for a URL
  resolved once; :class:`Sessions`: one per thread for one evaluation (keep-alive connections), closed together.
- :func:`read_body`: a streamed answer's body, each socket read bounded by the time left to the call's
  deadline (:class:`Late` when it passes) and the whole by :data:`MAX_BODY_BYTES` ('malformed' beyond).
- :func:`excerpt`: the start of a body for an error detail, a secret masked as ``***``.
"""

from __future__ import annotations

import threading
import time

import requests

from rewards.robust import CallFailure

__all__ = ["MAX_BODY_BYTES", "EXCERPT_BYTES", "Late", "excerpt", "read_body", "session_for", "Sessions"]

MAX_BODY_BYTES = 16 << 20
EXCERPT_BYTES = 200


class Late(Exception):
    """The call's deadline passed while reading the answer."""


def excerpt(body: bytes, secret: str = "") -> str:
    """The start of a body for an error detail, ``secret`` masked first (a cut must not leave part of it)."""
    if secret:
        body = body.replace(secret.encode(), b"***")
    return body[:EXCERPT_BYTES].decode("utf-8", "replace").strip()


def read_body(response: requests.Response, deadline: float) -> bytes:
    """The whole body of a streamed response, each socket read bounded by the time left to ``deadline``
    (``time.monotonic()`` seconds)."""
    raw = response.raw
    sock = getattr(getattr(raw, "connection", None), "sock", None)
    read1 = getattr(raw, "read1", None)  # urllib3 >= 2.3: at most one socket read per call
    parts, size = [], 0
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise Late()
        if sock is not None:
            sock.settimeout(left)
        piece = read1(1 << 16, decode_content=True) if read1 else raw.read(1 << 16, decode_content=True)
        if not piece:
            return b"".join(parts)
        parts.append(piece)
        size += len(piece)
        if size > MAX_BODY_BYTES:
            raise CallFailure("malformed", f"body larger than {MAX_BODY_BYTES} bytes")


def session_for(url: str) -> requests.Session:
    """A session with the environment's proxy and CA-bundle settings for ``url`` resolved once.

    requests would otherwise scan the environment on every request (about 0.5 ms each); ``~/.netrc`` is
    not consulted (authentication is ``token_env``'s).
    """
    session = requests.Session()
    settings = session.merge_environment_settings(url, {}, None, None, None)
    session.trust_env = False
    session.proxies.update(settings["proxies"])
    session.verify = settings["verify"]
    return session


class Sessions:
    """One ``requests.Session`` per thread for one evaluation (keep-alive connections); closed together."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._local = threading.local()
        self._all: list[requests.Session] = []
        self._lock = threading.Lock()

    def get(self) -> requests.Session:
        """This thread's session, made on its first request."""
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = session_for(self._url)
            with self._lock:
                self._all.append(session)
        return session

    def close(self) -> None:
        """Close every session made so far."""
        with self._lock:
            for session in self._all:
                session.close()
            self._all.clear()
