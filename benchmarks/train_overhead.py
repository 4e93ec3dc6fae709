"""What the Ray Train worker group costs: `tfft run`'s fine-tuning time against an in-process loop of the same steps.

    python -m benchmarks.train_overhead                                  # runs `tfft run` on the demo config
    python -m benchmarks.train_overhead --work runs/demo                 # reuses a finished run directory
    python -m benchmarks.train_overhead --config tune_configs/toy2d_left.yaml
    python -m benchmarks.train_overhead --no-local --no-one-worker       # only the config as it is

The run's ``summary.json`` gives the fine-tuning stage's wall time (``finetune_seconds``: trainer start to the
fine-tuned weights on the driver) and the training loop's own time inside the workers (``finetune_loop_seconds``).
The in-process loop then does the same solver steps with the same global batch, reward and objective in this
process (all cores, no Ray): solver step, backward, gradient clip, Adam with warm-up; twice, after the runs, and the
faster counts. Results go to ``benchmarks/results/train_overhead.{json,md}``; all times are from one run on one
machine. Besides the config as it is, the same config also runs (unless switched off) on Ray Train with one
worker holding every core (``finetune.num_workers=1``, ``finetune.cpus_per_worker`` = the cores; no DDP, one
worker process to start) and with ``finetune.backend=local`` (the loop in the driver process, no worker group),
and each fine-tuning stage is compared with the same in-process loop.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).parent / "results"


def in_process_seconds(work: Path) -> dict[str, Any]:
    """The fine-tuning of the run in ``work`` redone as a plain loop in this process; wall seconds and steps."""
    from benchmarks.run_job import job_from_run

    built = job_from_run(work, "adjoint")
    cfg, ft, model, solver = built.cfg, built.job.settings, built.model, built.solver
    opt = torch.optim.Adam(model.parameters(), lr=ft.lr)
    warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / max(ft.warmup_steps, 1)))
    dim = built.job.dim
    started = time.perf_counter()
    for step in range(1, ft.steps + 1):
        gen = torch.Generator().manual_seed(cfg.seed * 100_003 + step * 1009)
        result = solver.step(torch.randn(ft.batch_size * ft.oversample, dim, generator=gen), gen)
        opt.zero_grad(set_to_none=True)
        result.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), ft.grad_clip)
        opt.step()
        warmup.step()
    return {"seconds": time.perf_counter() - started, "steps": ft.steps, "batch": ft.batch_size,
            "workers_in_run": ft.num_workers, "threads": torch.get_num_threads()}


def _variants(args: argparse.Namespace, threads: int) -> list[tuple[str, list[str]]]:
    """(label, overrides) of each `tfft run` of the config: as it is, then the variants not switched off."""
    variants = [("as configured", [])]
    if not args.no_one_worker:
        variants.append((f"Ray Train, one worker with {threads} CPUs",
                         ["finetune.num_workers=1", f"finetune.cpus_per_worker={threads}"]))
    if not args.no_local:
        variants.append((f"`finetune.backend=local`, {threads} threads",
                         ["finetune.backend=local", "finetune.num_workers=1", f"finetune.cpus_per_worker={threads}"]))
    return variants


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tune_configs/toy2d_right.yaml")
    parser.add_argument("--work", type=Path, help="a finished `tfft run` directory (default: run the config now)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--no-local", action="store_true", help="skip the finetune.backend=local run")
    parser.add_argument("--no-one-worker", action="store_true",
                        help="skip the Ray Train run with one worker holding every core")
    args = parser.parse_args(argv)
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    cli = [sys.executable, "-c", "from pipelines.cli import main; raise SystemExit(main())"]
    scratch = Path(tempfile.mkdtemp(prefix="tfft-overhead-"))
    runs: list[dict[str, Any]] = []
    work = args.work
    for k, (label, overrides) in enumerate(_variants(args, threads)):
        if k == 0 and work is not None:
            directory = work
        else:
            directory = scratch / f"run{k}"
            config = args.config if work is None else str(work / "config.yaml")
            subprocess.run([*cli, "run", config, "--out", str(directory), *overrides], check=True)
        if k == 0:
            work = directory
        summary = json.loads((directory / "summary.json").read_text())
        runs.append({"label": label, "overrides": overrides, "run_wall_seconds": summary.get("wall_seconds"),
                     "finetune_seconds": summary["finetune_seconds"],
                     "finetune_loop_seconds": summary.get("finetune_loop_seconds")})
    assert work is not None
    # twice, the faster counts: a machine shared with other work only ever slows a loop down
    loops = [in_process_seconds(work) for _ in range(2)]
    local = min(loops, key=lambda r: r["seconds"])
    for run in runs:
        run["ratio"] = run["finetune_seconds"] / local["seconds"]
    result = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
        "config": args.config if args.work is None else str(work / "config.yaml"),
        "in_process": local, "in_process_seconds_both": [r["seconds"] for r in loops], "runs": runs,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "train_overhead.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# Ray Train's share of the fine-tuning time",
        "",
        f"`python -m benchmarks.train_overhead` on {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), "
        f"torch {torch.__version__}; config `{result['config']}`: {local['steps']} steps, global batch {local['batch']}, "
        f"{local['workers_in_run']} Ray Train workers as configured. The in-process loop (the same steps in one process, "
        f"{local['threads']} threads, no Ray) ran twice after the runs: "
        + ", ".join(f"{r['seconds']:.1f} s" for r in loops) + "; the faster is the reference.",
        "",
        "| run | `tfft run`, whole run (s) | fine-tuning stage (s) | training loop (s) | start-up and teardown (s) | "
        "stage / in-process loop | loop / in-process loop |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        loop = run["finetune_loop_seconds"]
        lines.append(
            f"| {run['label']} | {run['run_wall_seconds']:.1f} | {run['finetune_seconds']:.1f} | "
            + ("n/a | n/a | " if loop is None else f"{loop:.1f} | {run['finetune_seconds'] - loop:.1f} | ")
            + f"**{run['ratio']:.2f}** | " + ("n/a |" if loop is None else f"{loop / local['seconds']:.2f} |")
        )
    lines += ["", "The fine-tuning stage runs from the trainer's start to the fine-tuned weights on the driver; the "
              "training loop is the loop's own time inside the worker (`summary.json`: `finetune_seconds`, "
              "`finetune_loop_seconds`)."]
    (args.out / "train_overhead.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
