"""Request bodies of the example reward server (:mod:`rewards.examples.http_server`): the protocol's checks.

    body b'{"x": [[x_11, ..., x_1d], ..., [x_n1, ..., x_nd]], "cond": null | [c_1, ..., c_n]}'
        -> (rows: n lists of d floats, cond: None or n values)

A body that does not follow the protocol raises :class:`BadRequest` with the message the server answers
400 with; a ``Content-Length`` above :data:`MAX_BODY_BYTES` is refused before the body is read.
"""

from __future__ import annotations

import json
import math
from typing import Any

__all__ = ["MAX_BODY_BYTES", "Request", "BadRequest", "request_of"]

MAX_BODY_BYTES = 64 << 20

Request = tuple[list[list[float]], Any]  # (rows, cond) of a request


class BadRequest(Exception):
    """A request body that does not follow the protocol; the message says why."""


def request_of(body: bytes) -> tuple[list[list[float]], list[Any] | None]:
    """The rows and cond of a request body; BadRequest when it does not follow the protocol."""
    try:
        request = json.loads(body)
    except ValueError as exc:
        raise BadRequest(f"body is not JSON: {exc}") from None
    if not isinstance(request, dict) or "x" not in request:
        raise BadRequest('body must be an object {"x": [[...], ...], "cond": ...}')
    x, cond = request["x"], request.get("cond")
    if not isinstance(x, list) or not all(isinstance(row, list) and row for row in x):
        raise BadRequest("x must be a list of non-empty lists of numbers")
    if len({len(row) for row in x}) > 1:
        raise BadRequest("rows of x must have the same length")
    for row in x:
        for v in row:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise BadRequest(f"x must hold finite numbers, got {v!r}")
    if cond is not None and (not isinstance(cond, list) or len(cond) != len(x)):
        raise BadRequest("cond must be null or a list with one entry per row of x")
    return [[float(v) for v in row] for row in x], cond
