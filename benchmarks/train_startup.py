"""Ray Train's fixed cost: a TorchTrainer whose loop does nothing, on a local Ray.

    python -m benchmarks.train_startup                 # 2 workers x 1 CPU, 3 repetitions
    python -m benchmarks.train_startup --workers 1 --reps 5

Each repetition fits a ``TorchTrainer`` (the pipeline's poll interval, ``finetune.poll_interval_s`` 0.25 s) whose
loop imports the pipeline's worker module, prints the time since ``fit()`` was called, and reports once. The time
to the loop's first line is what every fine-tuning run pays before its first step (the controller actor, the
worker actors, torch's process group); the rest of ``fit()`` is the teardown. Ray Train's controller log
(JSON lines in the Ray session's ``logs/train``) splits the start-up further: when the controller's first record
was written, and how long the worker processes and the train context on them took. Compare with
``benchmarks/results/train_overhead.md``, where the same cost sits inside a whole run. Then, in fresh Python
processes (``--reps`` of them, after one that creates the SQLite store), what a fine-tuning worker's loop pays once
after torch is imported: the first optimiser (its first ``add_param_group`` imports ``torch._dynamo``, which
the in-process loop of ``train_overhead`` has paid before its clock starts), a second one for comparison, and
MLflow's import and client on an existing SQLite store (rank 0's logger, on its background thread). Results go to
``benchmarks/results/train_startup.{json,md}``; one run on one machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"


def _loop(config: dict[str, Any]) -> None:
    """The worker's loop: the pipeline's worker imports, then one report carrying the loop's start time."""
    import importlib

    from ray import train

    started = time.time()
    importlib.import_module("pipelines.finetune")  # what a fine-tuning worker imports first

    if train.get_context().get_world_rank() == 0:
        Path(config["mark"]).write_text(json.dumps({"loop_started": started, "imported": time.time()}))
    train.report({"done": 1})


_PHASES = {  # Ray Train's controller log message -> the phase it times
    "worker actors created in": "workers_created",
    "Train context initialized on workers in": "train_context",
    "Worker group startup completed in": "group_start",
}


def _controller_phases(called: float) -> dict[str, float]:
    """From the newest controller log of this Ray session (Ray Train writes JSON lines to
    ``<session>/logs/train/ray-train-sys-controller-*.log``): the controller's first record, in seconds after
    ``fit()`` was called, and the worker group's start-up phases it times itself. Empty when the log is not there
    (another Ray layout)."""
    import glob

    import ray

    try:
        session = ray._private.worker._global_node.get_session_dir_path()  # no public accessor in Ray 2.60
    except AttributeError:
        return {}
    logs = glob.glob(os.path.join(session, "logs", "train", "ray-train-sys-controller-*.log"))
    if not logs:
        return {}
    out: dict[str, float] = {}
    with open(max(logs, key=os.path.getmtime)) as handle:
        for k, line in enumerate(handle):
            record = json.loads(line)
            if k == 0:
                stamp, _, millis = record["asctime"].partition(",")
                out["controller_up"] = time.mktime(time.strptime(stamp, "%Y-%m-%d %H:%M:%S")) + int(millis) / 1000 - called
            for text, phase in _PHASES.items():
                if text in record["message"] and phase not in out:
                    out[phase] = float(record["message"].split(" in ")[-1].split("s")[0])
    return out


def fit_once(workers: int, storage: str, name: str) -> dict[str, float]:
    """One empty fit: seconds to the loop's first line, to the end of its imports, and of the whole fit, and
    the controller's own phases (`_controller_phases`)."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipelines.raysession import environ

    mark = os.path.join(storage, f"{name}.json")
    trainer = TorchTrainer(
        _loop, train_loop_config={"mark": mark},
        scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name=name, storage_path=storage),
    )
    with environ(RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.25"):
        called = time.time()
        trainer.fit()
        ended = time.time()
    seen = json.loads(Path(mark).read_text())
    return {"to_loop": seen["loop_started"] - called, "to_imported": seen["imported"] - called, "fit": ended - called,
            **_controller_phases(called)}


_FIRST_USE = """
import json, sys, time
import torch
t0 = time.perf_counter()
torch.optim.Adam(torch.nn.Linear(2, 2).parameters())
t1 = time.perf_counter()
torch.optim.Adam(torch.nn.Linear(2, 2).parameters())
t2 = time.perf_counter()
from mlflow.tracking import MlflowClient
t3 = time.perf_counter()
MlflowClient(tracking_uri=sys.argv[1]).search_experiments()
t4 = time.perf_counter()
print(json.dumps({"first_optimiser": t1 - t0, "second_optimiser": t2 - t1, "mlflow_import": t3 - t2,
                  "mlflow_open": t4 - t3}))
"""


def first_use_costs(reps: int) -> list[dict[str, float]]:
    """Seconds of the once-per-process costs inside a worker's loop (module docstring), one fresh process per
    repetition after a first one that creates the store."""
    import subprocess
    import sys

    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        runs = []
        for _ in range(reps + 1):
            out = subprocess.run([sys.executable, "-c", _FIRST_USE, uri], check=True, capture_output=True, text=True)
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return runs[1:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    import ray

    ray.init(num_cpus=max(2, args.workers), include_dashboard=False, logging_level="ERROR")
    try:
        with tempfile.TemporaryDirectory() as storage:
            runs = [fit_once(args.workers, storage, f"empty{k}") for k in range(args.reps)]
    finally:
        ray.shutdown()
    median = {key: statistics.median(r[key] for r in runs) for key in runs[0] if all(key in r for r in runs)}
    first = first_use_costs(args.reps)
    first_median = {key: statistics.median(r[key] for r in first) for key in first[0]}
    result = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "ray": ray.__version__},
              "workers": args.workers, "runs": runs, "median": median, "first_use": first,
              "first_use_median": first_median}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "train_startup.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# Ray Train's fixed cost: an empty TorchTrainer loop",
        "",
        f"`python -m benchmarks.train_startup --workers {args.workers} --reps {args.reps}` on {os.cpu_count()} CPU "
        f"cores, Ray {ray.__version__}, a local Ray started by the script; seconds after `fit()` was called.",
        "",
        "| repetition | loop's first line | after the worker's imports | `fit()` returned |",
        "|---|---|---|---|",
        *[f"| {k + 1} | {r['to_loop']:.2f} | {r['to_imported']:.2f} | {r['fit']:.2f} |" for k, r in enumerate(runs)],
        f"| median | {median['to_loop']:.2f} | {median['to_imported']:.2f} | {median['fit']:.2f} |",
    ]
    if "group_start" in median:
        lines += [
            "",
            "Where the time to the loop's first line goes, from Ray Train's controller log (its first record, seconds "
            "after `fit()`; then the worker group's start-up phases as the controller times them), medians:",
            "",
            "| controller's first record | worker processes created | train context initialised on them | "
            "worker group start-up in all |",
            "|---|---|---|---|",
            f"| {median['controller_up']:.2f} | {median['workers_created']:.2f} | {median['train_context']:.2f} | "
            f"{median['group_start']:.2f} |",
        ]
    lines += _first_use_lines(first_median, args.reps)
    (args.out / "train_startup.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def _first_use_lines(median: dict[str, float], reps: int) -> list[str]:
    return [
        "",
        f"Once per worker process, inside the loop (fresh Python processes with torch imported, median of {reps}):",
        "",
        "| first optimiser (imports torch._dynamo) | second optimiser | MLflow import | MLflow client on the store |",
        "|---|---|---|---|",
        f"| {median['first_optimiser']:.2f} | {median['second_optimiser']:.4f} | {median['mlflow_import']:.2f} | "
        f"{median['mlflow_open']:.2f} |",
    ]


if __name__ == "__main__":
    raise SystemExit(main())
