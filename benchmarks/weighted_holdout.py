"""Does weighted flow matching generalise? The held-out gain of the anchored loss, on held-out and on training rows.

    python -m benchmarks.weighted_holdout --run DIR                    # a finished `tfft run` of a weighted config
    python -m benchmarks.weighted_holdout --run DIR --lr 1e-3 1e-4     # several learning rates
    python -m benchmarks.weighted_holdout --run DIR --lr 1e-3 --l2-base 0 1 100   # pulled toward the base weights

DIR holds a finished run (its ``config.yaml``, ``summary.json`` and ``bank_base.parquet``), e.g.
``tfft run tune_configs/molecule_left.yaml --out DIR seed=0``. For each learning rate, this redoes the run's
fine-tuning in this process, as the pipeline builds it (`pipelines.train_build.build_solver` on the run's bank and
objective; Adam, warm-up and the config's schedule, gradient clip) with ``finetune.holdout_fraction`` 0.1, and
reports at five points of training the held-out gain L(base) - L(model) of the anchored loss (`tfft.holdout`:
positive when the model is closer to the tilted target's velocity than the base) on the held-out rows, and the
same gain on as many training rows (their own times and noises, drawn once). A gain higher on the training rows
than on the held-out ones is the model fitting its bank's rows rather than the tilted law. ``--l2-base`` adds
lambda ||theta - theta_base||^2 to the loss (each value a run at each learning rate): does pulling the weights
toward the base's make what the model learns generalise? Results go to
``benchmarks/results/weighted_holdout[_NAME].{md,json}``; one run on one machine.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).parent / "results"


def _training_rows_check(built: Any) -> Any:
    """The solver's gain check (`tfft.weighted.WeightedFlowMatchingSolver.holdout_check`) on as many training rows
    as are held out, with their own draws (seed + 2)."""
    solver = built.solver
    train = solver.train_rows
    pick = train[torch.randperm(len(train), generator=torch.Generator().manual_seed(1))[: solver.holdout.rows]]
    return solver.holdout_check(pick, seed=built.job.seed + 2, draws=4)


def measure(run: Path, lr: float, l2: float = 0.0) -> list[dict[str, float]]:
    """The run's fine-tuning at ``lr`` with ``l2`` ||theta - theta_base||^2 added to the loss; the held-out and
    training-rows gains at five points of training."""
    from benchmarks.run_job import job_from_run
    from pipelines.lr_schedule import lr_factor

    built = job_from_run(run, "weighted", lr=lr, holdout_fraction=0.1)
    model, solver, job, settings = built.model, built.solver, built.job, built.job.settings
    check = _training_rows_check(built)
    start = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, functools.partial(
        lr_factor, total=job.steps, warmup=settings.warmup_steps, schedule=settings.lr_schedule))
    points, started = [], time.time()
    for step in range(1, job.steps + 1):
        seed = job.seed * 100_003 + step * 1009
        opt.zero_grad(set_to_none=True)
        built.step(settings.batch_size, torch.Generator().manual_seed(seed), seed).backward()
        if l2:
            (l2 * sum((p - p0).pow(2).sum() for p, p0 in zip(model.parameters(), start))).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        opt.step()
        scheduler.step()
        if step % max(job.steps // 5, 1) == 0 or step == job.steps:
            held, held_se = solver.holdout_gain()
            train, train_se = check.gain(model)
            points.append({"step": step, "held_out": held, "held_out_se": held_se, "training_rows": train,
                           "training_rows_se": train_se})
            print(f"[weighted_holdout] lr {lr:g} l2 {l2:g} step {step}/{job.steps}: held-out {held:+.4f} +- {held_se:.4f}, "
                  f"training rows {train:+.4f} +- {train_se:.4f} ({time.time() - started:.0f} s)", flush=True)
    return points


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="a finished `tfft run` directory (weighted solver)")
    parser.add_argument("--lr", type=float, nargs="+", default=[1e-3, 1e-4])
    parser.add_argument("--l2-base", type=float, nargs="+", default=[0.0],
                        help="lambda of lambda ||theta - theta_base||^2 added to the loss (0: none)")
    parser.add_argument("--name", default="", help="results go to weighted_holdout_NAME.{md,json}")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if not (args.run / "summary.json").is_file():
        parser.error(f"--run {args.run}: no summary.json there (run `tfft run CONFIG --out {args.run}` first)")
    torch.set_num_threads(os.cpu_count() or 1)
    result: dict[str, Any] = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
        "run": str(args.run),
        "runs": {f"{lr:g}/{l2:g}": measure(args.run, lr, l2) for lr in args.lr for l2 in args.l2_base},
    }
    stem = "weighted_holdout" + (f"_{args.name}" if args.name else "")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# Weighted flow matching: the anchored loss's gain on held-out and on training rows",
        "",
        f"`python -m benchmarks.weighted_holdout --run {args.run}"
        + (f" --name {args.name}" if args.name else "") + f" --lr {' '.join(f'{lr:g}' for lr in args.lr)}"
        + (f" --l2-base {' '.join(f'{v:g}' for v in args.l2_base)}" if args.l2_base != [0.0] else "") + "` on "
        f"{os.cpu_count()} CPU cores, torch {torch.__version__}: the run's fine-tuning redone in one process with "
        "10% of its bank held out. Gain = L(base) - L(model) of the anchored loss (`tfft.holdout`), mean ± standard "
        "error over rows; 'training rows' are as many rows of the training part, with their own draws.",
        "",
        "| lr | lambda (l2 to the base) | step | held-out gain | training-rows gain |",
        "|---|---|---|---|---|",
    ]
    for key, points in result["runs"].items():
        lr, l2 = key.split("/")
        for p in points:
            lines.append(f"| {lr} | {l2} | {p['step']} | {p['held_out']:+.4f} ± {p['held_out_se']:.4f} | "
                         f"{p['training_rows']:+.4f} ± {p['training_rows_se']:.4f} |")
    (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
