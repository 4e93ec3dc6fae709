"""rewards.http.Endpoint against real loopback servers: values, fault injection, timeouts, token, kwargs.

The example server (rewards.examples.http_server) injects faults by each row's first coordinate x0, so the
reason a sample must get follows from its own input (``fault_of`` -> ``REASON_OF_FAULT``). A few raw
socket servers cover what it does not do on purpose: a dropped connection, a trickled body, an echoed
header.
"""

from __future__ import annotations

import contextlib
import logging
import math
import pickle
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pytest
import torch

from rewards.base import load_reward
from rewards.examples.http_server import REASON_OF_FAULT, fault_of, reward_of, serve
from rewards.http import Endpoint, parse_rewards
from rewards.robust import CallFailure

REPO = Path(__file__).resolve().parents[2]
TOKEN_ENV = "TFFT_TEST_HTTP_TOKEN"
TOKEN = "s3cret-token-4f1d9a"
FAST = {"backoff_s": 0.01, "timeout_s": 2.0}


@pytest.fixture(scope="module")
def server():
    """The example server with fault injection (bands of x0 in units of 1), recording every request."""
    srv, _ = serve(faults=True, record=True)
    yield srv
    srv.shutdown()


def expected_reason(row: np.ndarray) -> str:
    return REASON_OF_FAULT[fault_of(row)] if np.isfinite(row).all() else "nan"


def good_rows(rng: np.random.Generator, n: int, d: int = 2) -> np.ndarray:
    """Rows whose x0 lies in the good band [-4, 4]."""
    return rng.uniform(-3.9, 3.9, size=(n, d))


def requests_since(server, start: int) -> list:
    return server.log[start:]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def scripted(script: Callable[[socket.socket, bytes], None]) -> Iterator[str]:
    """A loopback server that reads each request (head and body) and hands the connection to ``script``."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)

    def handle(conn: socket.socket) -> None:
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            head, _, body = data.partition(b"\r\n\r\n")
            length = next(
                (int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")),
                0,
            )
            while len(body) < length:
                body += conn.recv(65536)
            with contextlib.suppress(OSError):
                script(conn, head)

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        listener.close()


def test_valid_rewards_equal_the_servers_function_and_cond_is_null(server):
    x = good_rows(np.random.default_rng(0), 37, d=3)
    start = len(server.log)
    result = Endpoint(server.url, batch_size=5, max_in_flight=3, **FAST).evaluate_detailed(x)
    assert result.valid.all() and result.n_calls == 8 and (result.attempts == 1).all()
    assert result.rewards.tolist() == [reward_of(row) for row in x.tolist()]  # exactly, through JSON
    logged = requests_since(server, start)
    assert len(logged) == 8 and all(r.cond is None and r.status == 200 for r in logged)
    assert sorted(row for r in logged for row in r.rows) == sorted(map(tuple, x.tolist()))


def test_cond_entries_travel_with_their_samples_through_bisection(server):
    x = good_rows(np.random.default_rng(1), 8)
    x[5, 0] = 4.5  # a 400: chunks holding it are bisected, the cond must follow each row
    cond = [{"id": i} for i in range(8)]
    start = len(server.log)
    result = Endpoint(server.url, batch_size=8, retries=0, **FAST).evaluate_detailed(x, cond=cond)
    assert result.errors == ["exception" if i == 5 else "" for i in range(8)]
    index = {tuple(row): i for i, row in enumerate(x.tolist())}
    for logged in requests_since(server, start):
        assert [c["id"] for c in logged.cond] == [index[row] for row in logged.rows]
    with pytest.raises(ValueError, match="cond"):
        Endpoint(server.url).evaluate_detailed(x, cond=cond[:3])


def test_every_fault_kind_in_one_batch(server):
    """Every sample accounted for once with its own reason; neighbours of bad samples keep their rewards;
    the transient 500 is retried and recovers; the 400 is never repeated; one hang costs a bounded time."""
    rng = np.random.default_rng(2)
    bands = {"error": (5.5, 9.5), "bad_request": (4.2, 4.8), "transient": (-4.8, -4.2), "garbage": (-9.5, -5.5),
             "null": (-20.0, -11.0)}
    x = [good_rows(rng, 20)]
    for low, high in bands.values():
        x.append(np.stack([rng.uniform(low, high, 2), rng.normal(size=2)], 1))
    x.append(np.array([[12.0, 0.5]]))  # the one hang
    x.append(np.array([[np.nan, 1.0]]))  # never sent: JSON has no NaN
    x = np.concatenate(x)[rng.permutation(32)]
    timeout_s, retries, backoff_s, batch_size = 0.5, 3, 0.01, 4
    endpoint = Endpoint(server.url, timeout_s=timeout_s, retries=retries, backoff_s=backoff_s,
                        batch_size=batch_size, max_in_flight=4)
    start = len(server.log)
    began = time.perf_counter()
    result = endpoint.evaluate_detailed(x)
    wall = time.perf_counter() - began

    want = [expected_reason(row) for row in x]
    assert result.errors == want and len(result.errors) == len(x) == 32
    assert result.failure_counts() == {"timeout": 1, "crash": 2, "exception": 2, "malformed": 2, "nan": 3}
    good = np.array([w == "" for w in want])
    np.testing.assert_array_equal(result.valid, good)
    assert result.rewards[good].tolist() == [reward_of(row) for row in x[good].tolist()]  # no valid reward lost
    assert np.isnan(result.rewards[~good]).all()

    logged = requests_since(server, start)
    finite = np.isfinite(x).all(1)
    assert len(logged) == result.n_calls  # one request per call: no chunk was all NaN
    assert sum(len(r.rows) for r in logged) == int(result.attempts[finite].sum())
    levels = int(math.log2(batch_size)) + 1  # 4 -> 2 -> 1
    for i, row in enumerate(map(tuple, x.tolist())):
        holding = [r for r in logged if row in r.rows]
        if not finite[i]:
            assert holding == []  # in the calls of its chunk until bisection left it out, never sent
            continue
        assert len(holding) == result.attempts[i]
        alone = [r for r in holding if r.rows == (row,)]
        fault = fault_of(row)
        if fault == "transient":
            assert result.valid[i] and result.attempts[i] > 1
        elif fault == "bad_request":  # one request per bisection level, none repeated
            assert result.attempts[i] == levels and [r.status for r in alone] == [400]
        elif fault in ("error", "garbage", "hang"):  # repeated alone until retries + 1 failures
            assert result.attempts[i] == retries + 1 and len(alone) == retries + 1 - (levels - 1)

    # the hang's lineage: `retries + 1` sequential requests of timeout_s each, back-offs between them
    # (bisection: backoff_s per level; repeats: backoff_s * 2**k), jitter up to 10%; everything else
    # is milliseconds on other slots. Lower bound: the requests really waited timeout_s.
    calls = max(retries + 1, levels)
    waits = backoff_s * ((levels - 1) + sum(2**k for k in range(calls - levels)))
    bound = calls * timeout_s + 1.1 * waits
    assert calls * timeout_s * 0.95 <= wall < bound + 1.5, (wall, bound)


def test_server_not_listening_is_a_crash_quickly():
    endpoint = Endpoint(f"http://127.0.0.1:{free_port()}", retries=1, batch_size=4, **FAST)
    began = time.perf_counter()
    result = endpoint.evaluate_detailed(np.zeros((8, 2)))
    assert result.errors == ["crash"] * 8 and (result.attempts == 3).all()  # 4 -> 2 -> 1, no retry left
    assert time.perf_counter() - began < 2.0


def test_dropped_connection_is_a_crash_and_is_retried():
    with scripted(lambda conn, head: None) as url:  # reads the request, closes without a word
        result = Endpoint(url, retries=2, batch_size=1, **FAST).evaluate_detailed(np.zeros((2, 2)))
    assert result.errors == ["crash", "crash"] and result.attempts.tolist() == [3, 3]


def test_a_trickled_body_is_cut_at_the_deadline():
    def trickle(conn: socket.socket, head: bytes) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 400\r\n\r\n")
        for _ in range(400):  # one byte every 20 ms: each read is fast, the whole body takes 8 s
            conn.sendall(b" ")
            time.sleep(0.02)

    with scripted(trickle) as url:
        began = time.perf_counter()
        result = Endpoint(url, timeout_s=0.4, retries=0, batch_size=1).evaluate_detailed(np.zeros((1, 2)))
        wall = time.perf_counter() - began
    assert result.errors == ["timeout"] and 0.38 <= wall < 1.2, wall


def test_http_statuses_and_bodies_map_to_reasons(server):
    x = good_rows(np.random.default_rng(3), 4)
    start = len(server.log)
    missing = Endpoint(server.url + "/nope", retries=3, batch_size=4, **FAST).evaluate_detailed(x)
    assert missing.errors == ["exception"] * 4 and (missing.attempts == 3).all()  # bisected, never repeated
    assert [r.status for r in requests_since(server, start)] == [404] * 7

    def answer(status: bytes, body: bytes) -> Callable[[socket.socket, bytes], None]:
        def script(conn: socket.socket, head: bytes) -> None:
            conn.sendall(b"HTTP/1.1 " + status + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        return script

    cases = [
        (b"429 Too Many Requests", b"slow down", "crash", 3),
        (b"503 Service Unavailable", b"", "crash", 3),
        (b"422 Unprocessable Entity", b'{"detail": "bad x"}', "exception", 1),
        (b"302 Found", b"", "exception", 1),
        (b"200 OK", b'{"rewards": [1.0, 2.0]}', "malformed", 3),
        (b"200 OK", b'{"reward": [1.0]}', "malformed", 3),
    ]
    for status, body, reason, attempts in cases:
        with scripted(answer(status, body)) as url:
            result = Endpoint(url, retries=2, batch_size=1, **FAST).evaluate_detailed(np.zeros((1, 2)))
        assert (result.errors, result.attempts.tolist()) == ([reason], [attempts]), status


def test_parse_rewards():
    np.testing.assert_array_equal(parse_rewards(b'{"rewards": [1, -2.5, null, NaN]}', 4), [1, -2.5, np.nan, np.nan])
    for body, size in [
        (b"not json", 1), (b"[1.0]", 1), (b'{"rewards": 1.0}', 1), (b'{"rewards": [1.0]}', 2),
        (b'{"rewards": ["1.0"]}', 1), (b'{"rewards": [true]}', 1), (b'{"rewards": [1e999999]}', 1),
        (b'{"rewards": [' + b"9" * 400 + b"]}", 1), (b"\xff\xfe", 1),
    ]:
        try:
            out = parse_rewards(body, size)
        except CallFailure as exc:
            assert exc.reason == "malformed", body
        else:  # 1e999999 is inf: a verdict on the sample ('nan'), not a malformed answer
            assert body == b'{"rewards": [1e999999]}' and out.tolist() == [math.inf]
    with pytest.raises(CallFailure) as failure:  # a secret across the excerpt's cut is masked whole
        parse_rewards(b"x" * 190 + TOKEN.encode() + b" and more", 1, secret=TOKEN)
    assert "***" in failure.value.detail and TOKEN[:4] not in failure.value.detail


def test_token_is_sent_from_the_environment_and_never_kept(set_env, caplog):
    srv, url = serve(token=TOKEN)
    try:
        endpoint = Endpoint(url, token_env=TOKEN_ENV, batch_size=2, retries=1, **FAST)
        x = good_rows(np.random.default_rng(4), 3)
        set_env(**{TOKEN_ENV: None})
        with pytest.raises(ValueError, match=f"token_env.*{TOKEN_ENV}"):
            endpoint.evaluate_detailed(x)  # missing where the reward runs: a clear error, no request
        assert srv.requests == 0
        set_env(**{TOKEN_ENV: TOKEN})
        result = endpoint.evaluate_detailed(x)
        assert result.valid.all() and result.rewards.tolist() == [reward_of(row) for row in x.tolist()]
        anonymous = Endpoint(url, batch_size=1, retries=2, **FAST).evaluate_detailed(x[:1])
        assert anonymous.errors == ["exception"] and anonymous.attempts.tolist() == [1]  # 401: not retried
        set_env(**{TOKEN_ENV: "not-the-token"})
        assert endpoint.evaluate_detailed(x[:1]).errors == ["exception"]
        assert srv.statuses[401] == 2
    finally:
        srv.shutdown()

    set_env(**{TOKEN_ENV: TOKEN})

    def echo(conn: socket.socket, head: bytes) -> None:  # a server that leaks the header into its error
        auth = [line for line in head.split(b"\r\n") if line.lower().startswith(b"authorization")]
        body = b"rejected " + auth[0] + b" (and more)"
        conn.sendall(b"HTTP/1.1 500 Oops\r\nContent-Length: %d\r\n\r\n" % len(body) + body)

    with scripted(echo) as echo_url, caplog.at_level(logging.DEBUG, logger="rewards.robust"):
        leaky = Endpoint(echo_url, token_env=TOKEN_ENV, batch_size=2, retries=0, **FAST)
        with pytest.raises(CallFailure) as failure:
            leaky.post(np.zeros((1, 2)))
        assert leaky.evaluate_detailed(np.zeros((2, 2))).errors == ["crash", "crash"]
    assert "Bearer ***" in failure.value.detail and TOKEN not in failure.value.detail
    assert "Bearer ***" in caplog.text and TOKEN not in caplog.text
    for text in (repr(endpoint), str(endpoint.value_kwargs()), str(vars(endpoint))):
        assert TOKEN not in text
    assert TOKEN.encode() not in pickle.dumps(endpoint)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"url": "ftp://host/x"}, "url"),
        ({"url": "127.0.0.1:8765"}, "url"),
        ({"url": "http://"}, "url"),
        ({"url": 8765}, "url"),
        ({"url": "http://user:pw@host"}, "url"),
        ({"timeout_s": 0}, "timeout_s"),
        ({"timeout_s": float("inf")}, "timeout_s"),
        ({"retries": -1}, "retries"),
        ({"retries": 1.5}, "retries"),
        ({"backoff_s": -0.1}, "backoff_s"),
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": True}, "batch_size"),
        ({"max_in_flight": 0}, "max_in_flight"),
        ({"token_env": "NOT A NAME"}, "token_env"),
        ({"token_env": 3}, "token_env"),
        ({"name": ""}, "name"),
        ({"version": None}, "version"),
    ],
)
def test_bad_kwargs_name_the_kwarg(kwargs, name):
    with pytest.raises(ValueError, match=name):
        Endpoint(**{"url": "http://127.0.0.1:8765", **kwargs})


def test_pickles_evaluates_and_loads_from_config(server):
    endpoint = load_reward("rewards.http:Endpoint", {"url": server.url, "batch_size": 3, "backoff_s": 0.01})
    assert isinstance(endpoint, Endpoint) and not endpoint.differentiable
    assert (endpoint.timeout_s, endpoint.retries, endpoint.max_in_flight, endpoint.token_env) == (30.0, 2, 4, "")
    assert endpoint.value_kwargs() == {"url": server.url} and endpoint.name == f"http:{server.url}"
    clone = pickle.loads(pickle.dumps(endpoint))
    x = good_rows(np.random.default_rng(5), 7)
    x[2, 0] = -15.0  # a null reward
    batch = clone.evaluate(torch.from_numpy(x))
    assert batch.errors == ["nan" if i == 2 else "" for i in range(7)]
    assert batch.rewards.dtype == torch.float64 and batch.attempts.dtype == torch.int64
    assert batch.rewards[batch.valid].tolist() == [reward_of(r) for i, r in enumerate(x.tolist()) if i != 2]
    assert clone.evaluate(torch.from_numpy(x[:2])).errors is None
    with pytest.raises(ValueError, match="batch_size"):
        load_reward("rewards.http:Endpoint", {"url": server.url, "batch_size": 0})


def test_cache_identity_is_the_url_and_version():
    from pipelines.reward_cache import reward_identity

    a = Endpoint("http://127.0.0.1:8765", timeout_s=5, retries=1, batch_size=4, token_env="A")
    b = Endpoint("http://127.0.0.1:8765", timeout_s=50, retries=3, batch_size=16, max_in_flight=8)
    c = Endpoint("http://127.0.0.1:8766")
    d = Endpoint("http://127.0.0.1:8765", version="2")
    key = lambda r: reward_identity("rewards.http:Endpoint", r.value_kwargs(), r.version)  # noqa: E731
    assert key(a) == key(b) != key(c) and key(a) != key(d)


def test_http_config_loads():
    from pipelines.config import load_config

    cfg = load_config(REPO / "tune_configs" / "toy2d_http.yaml")
    reward = load_reward(cfg.reward.target, cfg.reward.kwargs)
    assert isinstance(reward, Endpoint) and reward.url == "http://127.0.0.1:8765"
    assert cfg.finetune.solver in ("auto", "weighted")
    overrides = ["reward.target=rewards.http:Endpoint", "reward.kwargs.url=http://127.0.0.1:8765"]  # README's
    cfg = load_config(REPO / "tune_configs" / "toy2d_right.yaml", overrides)
    assert load_reward(cfg.reward.target, cfg.reward.kwargs).value_kwargs() == {"url": "http://127.0.0.1:8765"}
    from pipelines.stages.preflight import resolve_plan

    assert resolve_plan(cfg).solver == "weighted" and not resolve_plan(cfg).differentiable


def test_server_command_line_prints_its_url_and_serves():
    proc = subprocess.Popen(
        [sys.executable, "-m", "rewards.examples.http_server", "--port", "0", "--faults"],
        cwd=REPO, stdout=subprocess.PIPE, text=True,
    )
    try:
        line = proc.stdout.readline().strip()
        assert line.startswith("serving on http://127.0.0.1:"), line
        url = line.split()[-1]
        x = np.array([[1.0, 2.0], [-12.0, 0.0]])
        result = Endpoint(url, retries=0, **FAST).evaluate_detailed(x)
        assert result.errors == ["", "nan"] and result.rewards[0] == -5.0
    finally:
        proc.terminate()
        proc.wait(10)
