"""A reward behind an HTTP server: ``rewards.http:Endpoint``.

Protocol of one call on a chunk of B samples of dimension d (one request; B <= ``batch_size``)::

    POST {url}                                   Content-Type: application/json
    {"x": [[x_11, ..., x_1d], ..., [x_B1, ..., x_Bd]], "cond": null}
                                                 (+ "Authorization: Bearer <token>" with token_env)
    -> 200 {"rewards": [r_1, ..., r_B]}          r_i a number, or null for an invalid sample

``cond`` is null for now (the pipeline has no conditions); :meth:`Endpoint.evaluate_detailed` takes an
optional list of n JSON values and sends each chunk its entries. The verdict on a call:

- status 200 with that JSON: the rewards; null or a non-finite number marks that one sample invalid
  with reason 'nan' (a verdict on the sample: not retried);
- status 200 with any other body (not JSON, no ``rewards`` list, B' != B entries, a non-number):
  'malformed';
- no complete answer within ``timeout_s`` of sending the request: 'timeout';
- status 429 or 5xx, a refused, reset or dropped connection: 'crash';
- any other 4xx (400, 401, 403, 404, 422...): 'exception' with the status and the start of the body,
  not retried (the request itself is wrong); any other status (1xx, 2xx but 200, 3xx: redirects are
  not followed): the same.

Chunking, calls in flight, retries with exponential back-off and jitter (on 'timeout', 'crash' and
'malformed'; never on a 4xx, whose 'exception' says so) and bisection of failing chunks are
:func:`rewards.robust.evaluate_robust`'s: a sample that makes the server answer 400 ends up alone, its
neighbours get their rewards, and it costs about ``log2(batch_size) + 1`` requests, one per bisection
level. A sample with a non-finite coordinate (JSON has no NaN) is never sent: it is invalid ('nan').

Timeouts: connecting and waiting for the status line and headers share one budget of ``timeout_s``
(urllib3's ``Timeout(total=...)``); the body is then read one socket read at a time with the socket's
timeout set to what is left of it, so a server that never answers, or that trickles its body byte by
byte, costs ``timeout_s``. Bounded per socket read only (each read waits at most ``timeout_s``): a
server that trickles its status line and headers themselves, and, with urllib3 older than 2.3 (no
``read1``), the body as well.

The bearer token is read from ``os.environ[token_env]`` at each request, in the process where the
reward runs (a Ray actor), never stored on the object, and replaced by ``***`` in any error detail. The
reward is built on the driver, where the variable may be absent: a missing variable is a ``ValueError``
raised when the reward is first evaluated. Only ``url`` (with ``version``) makes the reward cache's key.

The kwargs' checks are :mod:`rewards.http_checks`'; sessions, bounded body reads and error excerpts are
:mod:`rewards.http_transport`'s.

Example (YAML)::

    reward:
      target: rewards.http:Endpoint
      kwargs: {url: "http://127.0.0.1:8765", timeout_s: 30, batch_size: 16, max_in_flight: 4}
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from typing import Any

import numpy as np
import requests
import torch
from urllib3.exceptions import HTTPError as Urllib3Error
from urllib3.exceptions import ReadTimeoutError
from urllib3.util import Timeout

from rewards.base import Reward, RewardBatch
from rewards.http_checks import check_token_env, check_url
from rewards.kwarg_checks import as_float, as_int
from rewards.http_transport import Late, Sessions, excerpt, read_body, session_for
from rewards.robust import DEFAULT_BACKOFF_S, DEFAULT_RETRIES, CallFailure, RobustResult, evaluate_robust

__all__ = ["Endpoint", "parse_rewards"]


def parse_rewards(body: bytes, size: int, *, secret: str = "") -> np.ndarray:
    """The rewards in a 200 answer's body -> (size,) float64, NaN for null; CallFailure('malformed') else.

    ``secret``: a string masked as ``***`` in the body excerpts of error details.
    """
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise CallFailure("malformed", f"body is not JSON: {excerpt(body, secret)!r}") from None
    rewards = data.get("rewards") if isinstance(data, dict) else None
    if not isinstance(rewards, list):
        raise CallFailure("malformed", f'body is not {{"rewards": [...]}}: {excerpt(body, secret)!r}')
    if len(rewards) != size:
        raise CallFailure("malformed", f"{len(rewards)} rewards for {size} samples")
    out = np.empty(size)
    for i, value in enumerate(rewards):
        if value is None:
            out[i] = math.nan
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise CallFailure("malformed", f"reward {i} is not a number or null: {value!r:.50}")
        else:
            try:
                out[i] = float(value)
            except OverflowError:  # an integer too large for a float
                raise CallFailure("malformed", f"reward {i} is out of range") from None
    return out


class Endpoint(Reward):
    """A reward computed by an HTTP server, on chunks of samples (see the module doc for the protocol).

    Args:
        url: where to POST, ``http://`` or ``https://``.
        timeout_s: seconds one request (one chunk) may take, from sending it to the end of the answer.
        retries: extra requests of a sample after failures (bisection counts; see rewards.robust);
            'exception' (4xx) is never retried.
        backoff_s: base back-off before a repeated request (doubles per repeat, plus up to 10% jitter).
        batch_size: samples per request.
        max_in_flight: requests at once (threads, one keep-alive connection each).
        token_env: name of an environment variable holding a bearer token, read where the reward runs;
            '' (the default): no ``Authorization`` header.
        name: identity of the reward (default ``http:`` + url); ``version``: bump it when the server's
            rewards change (it keys caches).

    Picklable (plain attributes only: sessions live for one evaluation); ``differentiable = False``, so
    the pipeline uses the weighted solver.
    """

    differentiable = False

    def __init__(
        self,
        url: str,
        timeout_s: float = 30.0,
        retries: int = DEFAULT_RETRIES,
        backoff_s: float = DEFAULT_BACKOFF_S,
        batch_size: int = 16,
        max_in_flight: int = 4,
        token_env: str = "",
        name: str | None = None,
        version: str = "1",
    ):
        self.url = check_url(url)
        self.timeout_s = as_float("Endpoint", "timeout_s", timeout_s, positive=True)
        self.retries = as_int("Endpoint", "retries", retries, 0)
        self.backoff_s = as_float("Endpoint", "backoff_s", backoff_s, positive=False)
        self.batch_size = as_int("Endpoint", "batch_size", batch_size, 1)
        self.max_in_flight = as_int("Endpoint", "max_in_flight", max_in_flight, 1)
        self.token_env = check_token_env(token_env)
        if name is not None and (not isinstance(name, str) or not name):
            raise ValueError(f"Endpoint: name must be a non-empty string or None, got {name!r}")
        self.name = name or f"http:{self.url}"
        if not isinstance(version, (str, int)) or isinstance(version, bool):
            raise ValueError(f"Endpoint: version must be a string, got {version!r}")
        self.version = str(version)

    def _token(self) -> str:
        """The bearer token from the environment ('' without ``token_env``); ValueError when it is missing."""
        if not self.token_env:
            return ""
        token = os.environ.get(self.token_env, "")
        if not token:
            raise ValueError(
                f"Endpoint: token_env names the environment variable {self.token_env!r}, which is not set "
                "(or empty) where the reward runs; set it there (e.g. in the Ray runtime_env or the worker's environment)"
            )
        return token

    def post(
        self, x: np.ndarray, cond: list[Any] | None = None, *, session: requests.Session | None = None
    ) -> np.ndarray:
        """One request on ``x`` (B, d) finite float64 -> rewards (B,) float64, NaN for null.

        Raises CallFailure ('timeout', 'crash', 'malformed'; 'exception' with ``retry=False``).
        """
        token = self._token()
        try:
            return self._post(x, cond, token, session)
        except CallFailure as exc:
            if token and token in exc.detail:
                raise CallFailure(exc.reason, exc.detail.replace(token, "***"), exc.retry) from None
            raise

    def _post(self, x: np.ndarray, cond: list[Any] | None, token: str, session: requests.Session | None) -> np.ndarray:
        body = json.dumps({"x": np.asarray(x, dtype=np.float64).tolist(), "cond": cond}, allow_nan=False)
        headers = {"Content-Type": "application/json", "Accept": "application/json", "Accept-Encoding": "identity"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        own = session is None
        session = session_for(self.url) if own else session
        deadline = time.monotonic() + self.timeout_s
        try:
            response = session.post(
                self.url, data=body.encode(), headers=headers, stream=True, allow_redirects=False,
                timeout=Timeout(total=self.timeout_s),
            )
            try:
                status, content = response.status_code, read_body(response, deadline)
            finally:
                response.close()
        except (Late, ReadTimeoutError, socket.timeout, requests.exceptions.Timeout):
            raise CallFailure("timeout", f"no complete answer within {self.timeout_s} s") from None
        except (requests.exceptions.RequestException, Urllib3Error, OSError) as exc:
            raise CallFailure("crash", f"{type(exc).__name__}: {str(exc)[:300]}") from None
        finally:
            if own:
                session.close()
        if status == 200:
            return parse_rewards(content, len(x), secret=token)
        if status == 429 or status >= 500:
            raise CallFailure("crash", f"HTTP {status}: {excerpt(content, token)!r}")
        raise CallFailure("exception", f"HTTP {status}: {excerpt(content, token)!r}", retry=False)

    def evaluate_detailed(self, x: np.ndarray, cond: list[Any] | None = None) -> RobustResult:
        """Rewards of ``x`` (n, d) with failure accounting (reasons, attempts, seconds per sample).

        ``cond``: None, or n JSON values (one per sample) sent with their samples. Raises ValueError when
        ``token_env`` names a variable that is not set here.
        """
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2:
            raise ValueError(f"Endpoint expects samples of shape (n, d), got {x.shape}")
        if cond is not None:
            cond = list(cond)
            if len(cond) != len(x):
                raise ValueError(f"Endpoint: cond has {len(cond)} entries for {len(x)} samples")
        self._token()  # fail early and clearly, not as a failed call per chunk
        sessions = Sessions(self.url)
        # the last column carries each row's index, so that a chunk (bisected or not) finds its cond
        rows = np.concatenate([x, np.arange(len(x), dtype=np.float64)[:, None]], axis=1)

        def call(chunk: np.ndarray) -> np.ndarray | tuple[np.ndarray, list[str]]:
            index = chunk[:, -1].astype(np.int64)
            values = chunk[:, :-1]
            finite = np.isfinite(values).all(axis=1)
            sent = index[finite]
            chunk_cond = None if cond is None else [cond[i] for i in sent]
            if finite.all():
                return self.post(values, chunk_cond, session=sessions.get())
            rewards = np.full(len(chunk), math.nan)
            if finite.any():
                rewards[finite] = self.post(values[finite], chunk_cond, session=sessions.get())
            return rewards, ["" if f else "nan" for f in finite.tolist()]

        try:
            return evaluate_robust(
                call, rows, batch_size=self.batch_size, max_in_flight=self.max_in_flight,
                retries=self.retries, backoff_s=self.backoff_s,
            )
        finally:
            sessions.close()

    def evaluate(self, x: torch.Tensor) -> RewardBatch:
        """x: (n, d) -> RewardBatch with errors and attempts (int64)."""
        if x.ndim != 2:
            raise ValueError(f"Endpoint expects samples of shape (n, d), got {tuple(x.shape)}")
        return self.evaluate_detailed(x.detach().cpu().to(torch.float64).numpy()).to_reward_batch()

    def value_kwargs(self) -> dict[str, Any]:
        """The kwargs that change reward values (the cache key, with ``version``): only the url."""
        return {"url": self.url}

    def __repr__(self) -> str:
        return (
            f"Endpoint(url={self.url!r}, timeout_s={self.timeout_s}, batch_size={self.batch_size}, "
            f"max_in_flight={self.max_in_flight}, token_env={self.token_env!r})"
        )
