"""A small reward server over HTTP, for the docs, the tests and the throughput benchmark.

Run: ``python -m rewards.examples.http_server --port 8765 [--host 127.0.0.1] [--delay-s 0.05] [--faults]
[--fault-scale 1.0] [--token-env NAME | --token TOKEN]``; it prints ``serving on http://HOST:PORT`` and
serves until interrupted. Standard library only (``http.server.ThreadingHTTPServer``: one thread per
connection). From Python, :func:`serve` starts one in a daemon thread and returns it with its URL.

Protocol (what :class:`rewards.http.Endpoint` speaks): ``POST /`` with the JSON body
``{"x": [[float, ...], ...], "cond": null | [value, ...]}``, n rows of the same length d >= 1 (``cond``,
when not null, has n entries; this server ignores it). The answer is status 200 and
``{"rewards": [float | null, ...]}`` with n entries, null marking an invalid sample. The reward of a row
is minus its squared norm, ``r(x) = -sum_j x_j ** 2`` (:func:`reward_of`), computed in Python floats.
A body that is not such a request is answered 400; a path other than ``/`` 404; with a token, a request
without the header ``Authorization: Bearer <token>`` 401. Every request first waits ``delay_s`` seconds
(the latency of a real model server).

Fault injection (``faults=True`` / ``--faults``) by each row's first coordinate, in units of
``fault_scale`` (s), so that a test can compute what happens to a sample from its own input
(:func:`fault_of`); when a request holds rows of several kinds, the first kind of this list decides:

    ========================  =========================================================  ===============
    x0                        the server                                                 client's reason
    ========================  =========================================================  ===============
    x0 > 10 s                 ``hang``: never answers (until the server shuts down)      timeout
    5 s < x0 <= 10 s          ``error``: answers 500, every time                         crash
    4 s < x0 <= 5 s           ``bad_request``: answers 400                               exception
    -5 s <= x0 < -4 s         ``transient``: 500 on the first request holding the row,   (valid)
                              then like a good row
    -10 s <= x0 < -5 s        ``garbage``: 200 with a body that is not JSON              malformed
    x0 < -10 s                ``null``: 200, null as this row's reward                   nan
    otherwise                 good: 200, r(x)                                            (valid)
    ========================  =========================================================  ===============

The server counts requests (``requests``, ``statuses``: answers per status, 0 for a request never
answered) and, with ``record=True``, keeps every request's rows, cond and status in ``log``.
"""

from __future__ import annotations

import argparse
import hmac
import json
import math
import os
import sys
import threading
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from rewards.examples.http_request import MAX_BODY_BYTES, BadRequest, Request, request_of

__all__ = ["FAULTS", "REASON_OF_FAULT", "Logged", "RewardServer", "fault_of", "reward_of", "serve", "main"]

FAULTS = ("hang", "error", "bad_request", "transient", "garbage", "null")  # in order of precedence
# The failure reason rewards.http.Endpoint gives a sample whose row has this fault ('' = valid).
REASON_OF_FAULT = {
    "": "", "hang": "timeout", "error": "crash", "bad_request": "exception", "transient": "", "garbage": "malformed",
    "null": "nan",
}
_HANG_S = 3600.0


def reward_of(row: list[float]) -> float:
    """The server's reward of one sample: minus its squared norm, summed left to right in Python floats."""
    total = 0.0
    for v in row:
        total += v * v
    return -total


def fault_of(row: list[float] | Any, scale: float = 1.0) -> str:
    """The fault that a row injects (one of :data:`FAULTS`, '' for none) by its first coordinate x0."""
    x0 = float(row[0]) / scale
    if x0 > 10:
        return "hang"
    if x0 > 5:
        return "error"
    if x0 > 4:
        return "bad_request"
    if -5 <= x0 < -4:
        return "transient"
    if -10 <= x0 < -5:
        return "garbage"
    if x0 < -10:
        return "null"
    return ""


@dataclass(frozen=True)
class Logged:
    """One request as the server saw it: its rows, its ``cond`` and the status it answered (0: never)."""

    rows: tuple[tuple[float, ...], ...]
    cond: Any
    status: int


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: one connection per client thread
    # headers and body leave in two writes: with Nagle's algorithm on, the body would wait for the
    # client's delayed ACK of the headers (about 40 ms per request on Linux)
    disable_nagle_algorithm = True
    server: RewardServer

    def log_message(self, format: str, *args: Any) -> None:  # quiet: counters instead of a line per request
        pass

    def _send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if status == 401:
            self.send_header("WWW-Authenticate", "Bearer")
        self.end_headers()
        self.wfile.write(body)

    def _answer(self, status: int, request: Request, body: bytes, content_type: str = "application/json") -> None:
        self.server.count(status, *request)
        self._send(status, body, content_type)

    def _error(self, status: int, message: str, request: Request = ([], None)) -> None:
        self._answer(status, request, json.dumps({"error": message}).encode())

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        server = self.server
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_BODY_BYTES:
            self.close_connection = True
            return self._error(400 if length < 0 else 413, f"Content-Length must be 0 to {MAX_BODY_BYTES} bytes")
        body = self.rfile.read(length)
        if self.path.split("?")[0] != "/":
            return self._error(404, f"no such path {self.path!r}; POST to /")
        if server.token is not None:
            given = self.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {server.token}".encode()):
                return self._error(401, "missing or wrong bearer token")
        try:
            request = request_of(body)
        except BadRequest as exc:
            return self._error(400, str(exc))
        rows = request[0]
        if server.delay_s > 0:
            server.release.wait(server.delay_s)
        fault = server.fault_of_request(rows)
        if fault == "hang":
            server.count(0, *request)
            server.release.wait(_HANG_S)
            self.close_connection = True
            return
        if fault in ("error", "transient"):
            return self._error(500, f"injected fault: {fault}", request)
        if fault == "bad_request":
            return self._error(400, "injected fault: bad_request", request)
        if fault == "garbage":
            return self._answer(200, request, b"this is not JSON", "text/plain")
        rewards = [None if server.fault_of_row(row) == "null" else reward_of(row) for row in rows]
        self._answer(200, request, json.dumps({"rewards": rewards}).encode())


class RewardServer(ThreadingHTTPServer):
    """The reward server (see the module doc); :meth:`shutdown` also releases hanging requests and closes it.

    Attributes:
        url: ``http://host:port`` it listens on.
        requests: requests answered or left hanging (malformed requests included).
        statuses: Counter of answers per status (0: a request left hanging).
        log: with ``record``, one :class:`Logged` per request, in the order they were answered.
    """

    daemon_threads = True

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        delay_s: float = 0.0,
        faults: bool = False,
        fault_scale: float = 1.0,
        token: str | None = None,
        record: bool = False,
    ):
        if not (math.isfinite(delay_s) and delay_s >= 0):
            raise ValueError(f"delay_s must be a finite number >= 0, got {delay_s!r}")
        if not (math.isfinite(fault_scale) and fault_scale > 0):
            raise ValueError(f"fault_scale must be a finite number > 0, got {fault_scale!r}")
        if token is not None and not token:
            raise ValueError("token must be a non-empty string or None")
        super().__init__((host, port), _Handler)
        self.delay_s, self.faults, self.fault_scale = float(delay_s), bool(faults), float(fault_scale)
        self.token, self.record = token, bool(record)
        self.url = f"http://{host}:{self.server_address[1]}"
        self.requests = 0
        self.statuses: Counter[int] = Counter()
        self.log: list[Logged] = []
        self.release = threading.Event()  # set at shutdown: hanging and waiting requests end
        self._lock = threading.Lock()
        self._seen: set[tuple[float, ...]] = set()  # transient rows already failed once

    def count(self, status: int, rows: list[list[float]], cond: list[Any] | None = None) -> None:
        """Count one answered (or hanging: status 0) request; keep it in ``log`` when recording."""
        with self._lock:
            self.requests += 1
            self.statuses[status] += 1
            if self.record:
                self.log.append(Logged(tuple(tuple(row) for row in rows), cond, status))

    def fault_of_row(self, row: list[float]) -> str:
        return fault_of(row, self.fault_scale) if self.faults else ""

    def fault_of_request(self, rows: list[list[float]]) -> str:
        """The fault that decides a request's answer ('' for none); transient rows count as seen when theirs."""
        kinds = {self.fault_of_row(row) for row in rows}
        for fault in FAULTS:
            if fault not in kinds:
                continue
            if fault == "transient":
                fresh = [tuple(r) for r in rows if self.fault_of_row(r) == "transient"]
                with self._lock:
                    new = [r for r in fresh if r not in self._seen]
                    self._seen.update(new)
                if not new:
                    continue
            return fault
        return ""

    def shutdown(self) -> None:
        """Stop serving (from another thread than :meth:`serve_forever`'s), release hanging requests, close."""
        self.release.set()
        super().shutdown()
        self.server_close()


def serve(
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    delay_s: float = 0.0,
    faults: bool = False,
    fault_scale: float = 1.0,
    token: str | None = None,
    record: bool = False,
) -> tuple[RewardServer, str]:
    """Start a :class:`RewardServer` in a daemon thread (port 0: a free port); returns it and its URL.

    Call ``server.shutdown()`` when done.
    """
    server = RewardServer(
        host, port, delay_s=delay_s, faults=faults, fault_scale=fault_scale, token=token, record=record
    )
    threading.Thread(target=server.serve_forever, args=(0.05,), name="reward-server", daemon=True).start()
    return server, server.url


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m rewards.examples.http_server", description="Serve r(x) = -||x||^2 over HTTP (POST /)."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--delay-s", type=float, default=0.0, help="seconds every request waits (latency)")
    parser.add_argument("--faults", action="store_true", help="inject faults by x0 (see the module doc)")
    parser.add_argument("--fault-scale", type=float, default=1.0, help="unit of the fault bands of x0")
    auth = parser.add_mutually_exclusive_group()
    auth.add_argument("--token-env", default="", help="require 'Authorization: Bearer $NAME' (env variable NAME)")
    auth.add_argument("--token", default="", help="require this bearer token (visible to ps: prefer --token-env)")
    args = parser.parse_args(argv)
    token = args.token or None
    if args.token_env:
        token = os.environ.get(args.token_env)
        if not token:
            parser.error(f"--token-env {args.token_env}: the environment variable is not set")
    server = RewardServer(
        args.host, args.port, delay_s=args.delay_s, faults=args.faults, fault_scale=args.fault_scale, token=token
    )
    print(f"serving on {server.url}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.release.set()
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
