"""What the Ray Train worker group costs: `tfft run`'s fine-tuning time against an in-process loop of the same steps.

    python -m benchmarks.train_overhead                                  # runs `tfft run` on the demo config
    python -m benchmarks.train_overhead --work runs/demo                 # reuses a finished run directory
    python -m benchmarks.train_overhead --config tune_configs/toy2d_left.yaml
    python -m benchmarks.train_overhead --no-local                       # without the local-backend run

The run's ``summary.json`` gives the fine-tuning stage's wall time (``finetune_seconds``: trainer start to the
fine-tuned weights on the driver) and the training loop's own time inside the workers (``finetune_loop_seconds``).
The in-process loop then does the same solver steps with the same global batch, reward and objective in this
process (all cores, no Ray): solver step, backward, gradient clip, Adam with warm-up. Results go to
``benchmarks/results/train_overhead.{json,md}``; all times are from one run on one machine. Unless ``--no-local``,
the same config also runs with ``finetune.backend=local`` (the loop in the driver process, no worker group; one
worker with ``finetune.cpus_per_worker`` set to the in-process loop's threads), and its fine-tuning stage is
compared with the same in-process loop.
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
    from pipelines.config import load_config
    from pipelines.finetune_job import FinetuneJob
    from pipelines.models import build_model
    from pipelines.pretrain import load_or_pretrain
    from pipelines.stages.preflight import training_steps
    from pipelines.train_build import build_solver
    from tfft.objective import Tilt

    cfg = load_config(work / "config.yaml")
    summary = json.loads((work / "summary.json").read_text())
    if summary["solver"] != "adjoint":
        raise SystemExit(f"{work}: the in-process loop is written for the adjoint solver, the run used {summary['solver']}")
    ft = cfg.finetune
    base_model = load_or_pretrain(cfg, log=lambda _: None)
    job = FinetuneJob(ft, base_model.config, base_model.state_dict, Tilt.from_dict(summary["objective"]),
                      cfg.reward.target, dict(cfg.reward.kwargs), cfg.seed, steps=ft.steps,
                      sde_steps=training_steps(cfg))
    base = build_model(base_model.config, base_model.state_dict).eval().requires_grad_(False)
    model = build_model(base_model.config, base_model.state_dict)
    solver, _ = build_solver(job, model, base, torch.device("cpu"))
    opt = torch.optim.Adam(model.parameters(), lr=ft.lr)
    warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / max(ft.warmup_steps, 1)))
    dim = int(base_model.config["dim"])
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tune_configs/toy2d_right.yaml")
    parser.add_argument("--work", type=Path, help="a finished `tfft run` directory (default: run the config now)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--no-local", action="store_true", help="skip the finetune.backend=local run")
    args = parser.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    work = args.work
    cli = [sys.executable, "-c", "from pipelines.cli import main; raise SystemExit(main())"]
    scratch = Path(tempfile.mkdtemp(prefix="tfft-overhead-"))
    if work is None:
        work = scratch / "run"
        subprocess.run([*cli, "run", args.config, "--out", str(work)], check=True)
    summary = json.loads((work / "summary.json").read_text())
    local = in_process_seconds(work)
    backend_local = None
    if not args.no_local:
        subprocess.run([*cli, "run", str(work / "config.yaml"), "--out", str(scratch / "run_local"),
                        "finetune.backend=local", "finetune.num_workers=1",
                        f"finetune.cpus_per_worker={local['threads']}"], check=True)  # the in-process loop's threads
        backend_local = json.loads((scratch / "run_local" / "summary.json").read_text())
    result = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
        "config": args.config if args.work is None else str(work / "config.yaml"),
        "run_wall_seconds": summary.get("wall_seconds"),
        "finetune_seconds": summary["finetune_seconds"],
        "finetune_loop_seconds": summary.get("finetune_loop_seconds"),
        "in_process": local,
        "ratio": summary["finetune_seconds"] / local["seconds"],
        "local_backend": None if backend_local is None else {
            "run_wall_seconds": backend_local.get("wall_seconds"),
            "finetune_seconds": backend_local["finetune_seconds"],
            "finetune_loop_seconds": backend_local.get("finetune_loop_seconds"),
            "ratio": backend_local["finetune_seconds"] / local["seconds"],
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "train_overhead.json").write_text(json.dumps(result, indent=2) + "\n")
    loop = result["finetune_loop_seconds"]
    lines = [
        "# Ray Train's share of the fine-tuning time",
        "",
        f"`python -m benchmarks.train_overhead` on {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), "
        f"torch {torch.__version__}; config `{result['config']}`: {local['steps']} steps, global batch {local['batch']}, "
        f"{local['workers_in_run']} Ray Train workers in the run.",
        "",
        "| what | seconds |",
        "|---|---|",
        f"| `tfft run`, whole run | {result['run_wall_seconds']:.1f} |",
        f"| fine-tuning stage (trainer start to weights on the driver) | {result['finetune_seconds']:.1f} |",
        f"| training loop inside the workers | {'n/a' if loop is None else f'{loop:.1f}'} |",
        f"| the same steps in one process ({local['threads']} threads, no Ray) | {local['seconds']:.1f} |",
        "",
        f"Ratio of the fine-tuning stage to the in-process loop: **{result['ratio']:.2f}**"
        + ("" if loop is None else f" (worker-group start-up and teardown: {result['finetune_seconds'] - loop:.1f} s; "
           f"the loop itself: {loop / local['seconds']:.2f}x the in-process loop)") + ".",
    ]
    if result["local_backend"] is not None:
        lb = result["local_backend"]
        lb_loop = lb["finetune_loop_seconds"]
        lines += [
            "",
            f"The same config with `finetune.backend=local finetune.num_workers=1 finetune.cpus_per_worker={local['threads']}` "
            "(the loop in the driver with the in-process loop's threads, no worker group):",
            "",
            "| what | seconds |",
            "|---|---|",
            f"| `tfft run`, whole run | {lb['run_wall_seconds']:.1f} |",
            f"| fine-tuning stage | {lb['finetune_seconds']:.1f} |",
            f"| training loop | {'n/a' if lb_loop is None else f'{lb_loop:.1f}'} |",
            "",
            f"Ratio of its fine-tuning stage to the in-process loop: **{lb['ratio']:.2f}**.",
        ]
    (args.out / "train_overhead.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
