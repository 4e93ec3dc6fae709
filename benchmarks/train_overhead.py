"""What the Ray Train worker group costs: `tfft run`'s fine-tuning time against an in-process loop of the same steps.

    python -m benchmarks.train_overhead                                  # runs `tfft run` on the demo config
    python -m benchmarks.train_overhead --work runs/demo                 # reuses a finished run directory
    python -m benchmarks.train_overhead --config tune_configs/toy2d_left.yaml
    python -m benchmarks.train_overhead --no-local --no-one-worker       # only the config as it is
    python -m benchmarks.train_overhead --rounds 3                       # paired rounds (default 1)

The run's ``summary.json`` gives the fine-tuning stage's wall time (``finetune_seconds``: trainer start to the
fine-tuned weights on the driver) and the training loop's own time inside the workers (``finetune_loop_seconds``).
The in-process loop then does the same solver steps with the same global batch, reward and objective in this
process (all cores, no Ray): solver step, backward, gradient clip, Adam with warm-up. With ``--rounds R`` the
whole comparison runs R times in paired rounds: each round runs every variant afresh and then the in-process loop
once, and each ratio is taken within its round; the tables give the median over rounds with the range. This
machine's speed drifts by more than the effect measured (the same in-process loop took 27.1 s in one run and
30.0 s in the next), so a ratio of a run and a loop timed minutes apart is not one number. With one round the
in-process loop runs twice after the runs and the faster counts. Results go to
``benchmarks/results/train_overhead.{json,md}``; all times are from one run on one machine. Besides the config
as it is, the same config also runs (unless switched off) on Ray Train with one worker holding every core
(``finetune.num_workers=1``, ``finetune.cpus_per_worker`` = the cores; no DDP, one worker process to start) and
with ``finetune.backend=local`` (the loop in the driver process, no worker group), and each fine-tuning stage is
compared with the same in-process loop.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
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


def _run_variant(cli: list[str], config: str, directory: Path, label: str, overrides: list[str]) -> dict[str, Any]:
    """One `tfft run` of ``config`` with ``overrides`` into ``directory`` (reused when it holds a summary)."""
    if not (directory / "summary.json").is_file():
        subprocess.run([*cli, "run", config, "--out", str(directory), *overrides], check=True)
    summary = json.loads((directory / "summary.json").read_text())
    return {"label": label, "overrides": overrides, "run_wall_seconds": summary.get("wall_seconds"),
            "finetune_seconds": summary["finetune_seconds"], "finetune_loop_seconds": summary.get("finetune_loop_seconds")}


def _round(args: argparse.Namespace, cli: list[str], threads: int, scratch: Path, k: int) -> dict[str, Any]:
    """Every variant run afresh, then the in-process loop (twice with one round, the faster counting)."""
    runs, work = [], args.work if k == 0 else None
    for v, (label, overrides) in enumerate(_variants(args, threads)):
        directory = work if (v == 0 and work is not None) else scratch / f"round{k}-run{v}"
        config = args.config if args.work is None else str(args.work / "config.yaml")
        runs.append(_run_variant(cli, config, directory, label, overrides))
        if v == 0:
            work = directory
    assert work is not None
    loops = [in_process_seconds(work) for _ in range(2 if args.rounds == 1 else 1)]
    local = min(loops, key=lambda r: r["seconds"])
    for run in runs:
        run["ratio"] = run["finetune_seconds"] / local["seconds"]
        loop = run["finetune_loop_seconds"]
        run["loop_ratio"] = None if loop is None else loop / local["seconds"]
    return {"in_process": local, "in_process_seconds_all": [r["seconds"] for r in loops], "runs": runs}


def _median_range(values: list[float]) -> str:
    """'median' with one value, else 'median (lowest-highest)'."""
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def _markdown(result: dict[str, Any]) -> list[str]:
    rounds = result["rounds"]
    first = rounds[0]
    loops = [r["in_process"]["seconds"] for r in rounds]
    how = (f"ran twice after the runs: {', '.join(f'{s:.1f} s' for s in first['in_process_seconds_all'])}; the "
           "faster is the reference" if len(rounds) == 1 else
           f"ran once per round, after that round's runs ({len(rounds)} paired rounds): "
           + ", ".join(f"{s:.1f} s" for s in loops) + "; each ratio is within its round, median (range)")
    local = first["in_process"]
    lines = [
        "# Ray Train's share of the fine-tuning time",
        "",
        f"`{result['command']}` on {result['machine']['cpus']} CPU cores ({platform.processor() or platform.machine()}), "
        f"torch {result['machine']['torch']}; config `{result['config']}`: {local['steps']} steps, global batch "
        f"{local['batch']}, {local['workers_in_run']} Ray Train workers as configured. The in-process loop (the same "
        f"steps in one process, {local['threads']} threads, no Ray) {how}.",
        "",
        "| run | `tfft run`, whole run (s) | fine-tuning stage (s) | training loop (s) | start-up and teardown (s) | "
        "stage / in-process loop | loop / in-process loop |",
        "|---|---|---|---|---|---|---|",
    ]
    for v, run in enumerate(first["runs"]):
        per = [r["runs"][v] for r in rounds]
        med = {key: statistics.median(p[key] for p in per) for key in ("run_wall_seconds", "finetune_seconds")}
        loops_v = [p["finetune_loop_seconds"] for p in per]
        has_loop = all(x is not None for x in loops_v)
        loop = statistics.median(loops_v) if has_loop else None
        lines.append(
            f"| {run['label']} | {med['run_wall_seconds']:.1f} | {med['finetune_seconds']:.1f} | "
            + ("n/a | n/a | " if loop is None else
               f"{loop:.1f} | {statistics.median(p['finetune_seconds'] - p['finetune_loop_seconds'] for p in per):.1f} | ")
            + f"**{_median_range([p['ratio'] for p in per])}** | "
            + ("n/a |" if loop is None else f"{_median_range([p['loop_ratio'] for p in per])} |")
        )
    lines += ["", "Times are medians over rounds. The fine-tuning stage runs from the trainer's start to the "
              "fine-tuned weights on the driver; the training loop is the loop's own time inside the worker "
              "(`summary.json`: `finetune_seconds`, `finetune_loop_seconds`)."]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tune_configs/toy2d_right.yaml")
    parser.add_argument("--work", type=Path, help="a finished `tfft run` directory for the first round's config run")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--rounds", type=int, default=1, help="paired rounds (module docstring)")
    parser.add_argument("--no-local", action="store_true", help="skip the finetune.backend=local run")
    parser.add_argument("--no-one-worker", action="store_true",
                        help="skip the Ray Train run with one worker holding every core")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    cli = [sys.executable, "-c", "from pipelines.cli import main; raise SystemExit(main())"]
    scratch = Path(tempfile.mkdtemp(prefix="tfft-overhead-"))
    rounds = [_round(args, cli, threads, scratch, k) for k in range(args.rounds)]
    command = "python -m benchmarks.train_overhead" + (f" --rounds {args.rounds}" if args.rounds > 1 else "")
    result = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
        "command": command,
        "config": args.config if args.work is None else str(args.work / "config.yaml"), "rounds": rounds,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "train_overhead.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = _markdown(result)
    (args.out / "train_overhead.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
