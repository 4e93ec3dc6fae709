"""Throughput of ``rewards.http:Endpoint`` against a server whose requests take 50 ms.

    python -m benchmarks.http_throughput            # about 2 minutes
    python -m benchmarks.http_throughput --quick    # one short run per point, 20 s

Claim checked: P processes x M requests in flight each reach at least 90% of the ideal
P * M * batch / 0.05 samples/s, for P * M up to 16.

Setup: the example server (``python -m rewards.examples.http_server --delay-s 0.05``, a thread per
connection) in a process of its own; P client processes (multiprocessing, spawn), each holding one
``Endpoint(batch_size=16, max_in_flight=M)``, the way P reward actors would. Each point: every client
warms up (its connections open), then all start together and each evaluates M * 16 * K samples, K
requests per slot (K = 60: 3 s at the ideal rate); the rate is all samples over the wall time from the
first start to the last end, tail included, and a point's figure is the median of 3 such runs (each
run is in the JSON file). Results go to ``benchmarks/results/http_throughput.{md,json}``
with the machine's CPU count and load average, which matter: other work on the machine slows the
clients and the server alike.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).parents[1]
DELAY_S = 0.05
BATCH = 16
POINTS = [(1, 1), (1, 2), (2, 1), (1, 4), (2, 2), (1, 8), (2, 4), (1, 16), (2, 8)]  # (P, M), P * M <= 16


def _client(url: str, commands: Any, results: Any) -> None:
    """A client process: per command (M, n), warm up, report ready, wait for 'go', time one evaluation."""
    from rewards.http import Endpoint

    while True:
        command = commands.get()
        if command is None:
            return
        in_flight, n = command
        endpoint = Endpoint(url, batch_size=BATCH, max_in_flight=in_flight, retries=0, timeout_s=10)
        x = np.random.default_rng(os.getpid()).uniform(-1, 1, size=(n, 2))
        endpoint.evaluate_detailed(x[: BATCH * in_flight])  # threads and connections up, imports done
        results.put("ready")
        assert commands.get() == "go"
        start = time.monotonic()  # system-wide on Linux: comparable across the clients
        result = endpoint.evaluate_detailed(x)
        results.put({"start": start, "end": time.monotonic(), "n": n, "valid": int(result.valid.sum()),
                     "requests": result.n_calls})


def _start_server() -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "rewards.examples.http_server", "--port", "0", "--delay-s", str(DELAY_S)],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )
    line = proc.stdout.readline().strip()
    if not line.startswith("serving on "):
        proc.kill()
        raise RuntimeError(f"the example server did not start: {line!r}")
    return proc, line.split()[-1]


def measure(
    clients: list[tuple[Any, Any]], results: Any, processes: int, in_flight: int, per_slot: int, repeats: int
) -> dict:
    """The median over ``repeats`` runs of P = ``processes`` clients with M = ``in_flight`` each."""
    runs = [_run(clients, results, processes, in_flight, per_slot) for _ in range(repeats)]
    rates = [r["samples_per_s"] for r in runs]
    point = dict(sorted(runs, key=lambda r: r["samples_per_s"])[len(runs) // 2])
    point["runs_samples_per_s"] = rates
    return point


def _run(clients: list[tuple[Any, Any]], results: Any, processes: int, in_flight: int, per_slot: int) -> dict:
    n = in_flight * BATCH * per_slot
    for commands, _ in clients[:processes]:
        commands.put((in_flight, n))
    for _ in range(processes):
        assert results.get(timeout=120) == "ready"
    for commands, _ in clients[:processes]:
        commands.put("go")
    runs = [results.get(timeout=600) for _ in range(processes)]
    wall = max(r["end"] for r in runs) - min(r["start"] for r in runs)
    total = sum(r["n"] for r in runs)
    assert all(r["valid"] == r["n"] for r in runs), runs
    ideal = processes * in_flight * BATCH / DELAY_S
    rate = total / wall
    return {
        "processes": processes, "in_flight": in_flight, "concurrency": processes * in_flight, "samples": total,
        "requests": sum(r["requests"] for r in runs), "wall_s": wall, "ideal_samples_per_s": ideal,
        "samples_per_s": rate, "fraction_of_ideal": rate / ideal, "meets_90": rate / ideal >= 0.9,
        "ms_per_request": 1000 * wall / per_slot,  # per slot: 50 ms of server delay + the rest
    }


def write(result: dict) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "http_throughput.json").write_text(json.dumps(result, indent=2) + "\n")
    m = result["machine"]
    lines = [
        "# Throughput of rewards.http:Endpoint against a 50 ms server",
        "",
        f"{result['date']}, `{result['command']}`: {m['cpus']} CPUs ({m['platform']}), Python {m['python']}, "
        f"requests {m['requests']}; load average {m['load_before'][0]:.2f} before, {m['load_after'][0]:.2f} "
        "after (1 min).",
        "",
        f"Example server (`--delay-s {DELAY_S}`, thread per connection) in its own process; P client processes, "
        f"each one `Endpoint(batch_size={BATCH}, max_in_flight=M)`; {result['per_slot']} requests per slot, "
        "all clients started together, wall time from the first start to the last end; the median of "
        f"{result['repeats']} runs per point (all of them in `http_throughput.json`).",
        "",
        "| P | M | P·M | ideal P·M·16/0.05 (samples/s) | measured (samples/s) | fraction | ≥ 90% | ms per request "
        "| single runs (fraction) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["points"]:
        lines.append(
            f"| {r['processes']} | {r['in_flight']} | {r['concurrency']} | {r['ideal_samples_per_s']:.0f} | "
            f"{r['samples_per_s']:.0f} | {r['fraction_of_ideal']:.1%} | {'yes' if r['meets_90'] else 'no'} | "
            f"{r['ms_per_request']:.1f} | "
            + ", ".join(f"{x / r['ideal_samples_per_s']:.1%}" for x in r.get("runs_samples_per_s", []))
            + " |"
        )
    failing = [r for r in result["points"] if not r["meets_90"]]
    lines.append("")
    if failing:
        worst = min(failing, key=lambda r: r["fraction_of_ideal"])
        lines.append(
            f"The 90% bound fails at {len(failing)} point(s) (worst: P={worst['processes']}, M={worst['in_flight']}, "
            f"{worst['fraction_of_ideal']:.1%}, {worst['ms_per_request']:.1f} ms per request against the server's "
            f"{1000 * DELAY_S:.0f} ms): the time beyond 50 ms is the client's and the server's CPU per request "
            "(JSON, HTTP parsing, threads), which on this machine shares its cores with everything else running."
        )
    else:
        lines.append("Every point reaches at least 90% of the ideal rate (the median of its runs).")
    below = sum(x < 0.9 * r["ideal_samples_per_s"] for r in result["points"] for x in r.get("runs_samples_per_s", []))
    if below:
        lines.append(f"{below} single run(s) fell below 90%: the margin is a few ms per request, which other "
                     "work on the machine takes.")
    (RESULTS / "http_throughput.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one run of 20 requests per slot per point")
    args = parser.parse_args()
    import requests

    per_slot, repeats = (20, 1) if args.quick else (60, 3)
    load_before = os.getloadavg()
    server, url = _start_server()
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    clients = []
    for _ in range(max(p for p, _ in POINTS)):
        commands = ctx.Queue()
        proc = ctx.Process(target=_client, args=(url, commands, results), daemon=True)
        proc.start()
        clients.append((commands, proc))
    points = []
    try:
        for processes, in_flight in POINTS:
            point = measure(clients, results, processes, in_flight, per_slot, repeats)
            points.append(point)
            print(f"P={processes} M={in_flight}: {point['samples_per_s']:.0f} samples/s of ideal "
                  f"{point['ideal_samples_per_s']:.0f} ({point['fraction_of_ideal']:.1%})", flush=True)
    finally:
        for commands, proc in clients:
            commands.put(None)
        for _, proc in clients:
            proc.join(30)
        server.terminate()
        server.wait(30)
    result = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": "python -m benchmarks.http_throughput" + (" --quick" if args.quick else ""),
        "machine": {
            "cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "requests": requests.__version__, "load_before": load_before, "load_after": os.getloadavg(),
        },
        "delay_s": DELAY_S, "batch_size": BATCH, "per_slot": per_slot, "repeats": repeats, "points": points,
    }
    write(result)


if __name__ == "__main__":
    main()
