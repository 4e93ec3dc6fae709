"""Speed of the fine-tuning step against its floor, and against another checkout of the library.

    python -m benchmarks.step_speed                        # this machine's CPU (and CUDA when present)
    python -m benchmarks.step_speed --baseline DIR         # also time the `tfft` package found in DIR
                                                           # (mkdir -p DIR && git archive REV tfft | tar -x -C DIR)
    python -m benchmarks.step_speed --quick                # fewer repetitions

For each model shape (batch n, K = 40 SDE steps, Adam step included) it times:
- the adjoint-matching step on the fast path and on the reference path (`AdjointMatchingConfig.fast`), for a
  right-tail objective (alpha 0.1: about one trajectory in ten carries an adjoint) and the expected reward;
- its floor: the network passes of the reference algorithm done plainly, in the same process: K no-grad
  forwards on n rows, K forwards with an input vector-Jacobian product, one forward and backward on the m n rows
  of the loss, one Adam step;
- the bank's SDE sampler (samples/s at 100 steps) and the weighted flow-matching step;
- with ``--baseline DIR``, the same adjoint steps of the library in DIR (e.g. a `git worktree` of an older
  commit), in a child process on the same machine, so that "faster than before" is a ratio from one run.

Results go to ``benchmarks/results/step_speed_<device>.{json,md}`` with the machine, the GPU and torch's version.
Times are medians over repetitions after warm-up; every ratio compares numbers from this one run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).parent / "results"
SHAPES = {  # name: (dimension, hidden, depth, batch)
    "2-D task MLP (hidden 128, depth 3)": (2, 128, 3, 512),
    "66-dim (alanine) MLP (hidden 512, depth 4)": (66, 512, 4, 512),
    "3072-dim MLP (hidden 2048, depth 4)": (3072, 2048, 4, 256),
}
CPU_SHAPES = list(SHAPES)[:2]
STEPS = 40


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _median_ms(fn: Any, device: str, reps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(1000.0 * (time.perf_counter() - start))
    return statistics.median(times)


def _models(shape: str, device: str) -> tuple[Any, Any, int, int]:
    from tfft.model import VelocityMLP

    dim, hidden, depth, batch = SHAPES[shape]
    torch.manual_seed(0)
    base = VelocityMLP(dim, hidden, depth).to(device).requires_grad_(False)
    model = VelocityMLP(dim, hidden, depth).to(device)
    model.load_state_dict(base.state_dict())
    return model, base, dim, batch


def _adam(model: Any, device: str) -> torch.optim.Optimizer:
    """The fine-tuning optimiser as the pipeline builds it (fused kernels on CUDA)."""
    return torch.optim.Adam(model.parameters(), lr=1e-5, fused=device == "cuda")


def _reward_fn(objective: str, model: Any, dim: int, device: str) -> Any:
    """r(x) = -||x - 1||^2 / 2 with its gradient; the tail threshold is the 90% quantile over SDE samples."""
    from tfft.pseudo import pseudo_reward_signal
    from tfft.sampling import sample_sde

    eta = None
    if objective == "tail":
        with torch.no_grad():
            gen = torch.Generator(device=device).manual_seed(1)
            x = sample_sde(model, torch.randn(4096, dim, generator=gen, device=device), STEPS, generator=gen)
        eta = float(torch.quantile(-(x - 1).pow(2).sum(1) / 2, 0.9))

    def fn(x1: torch.Tensor) -> Any:
        r = -(x1 - 1).pow(2).sum(1) / 2
        valid = torch.ones(len(x1), dtype=torch.bool, device=x1.device)
        return pseudo_reward_signal(r, -(x1 - 1), valid, eta=eta, side="right", alpha=0.1 if eta is not None else 1.0)

    return fn


def _adjoint_step_ms(shape: str, device: str, objective: str, fast: bool | None, reps: int,
                     autocast: torch.dtype | None = None) -> tuple[float, float]:
    """One solver step, backward and Adam step: (median ms, active fraction of the last step).

    ``fast=None``: a library without the switch (a baseline). ``autocast``: the network calls under
    ``torch.autocast`` with this dtype (`AdjointMatchingConfig.autocast`, ``finetune.autocast``)."""
    from tfft.solvers import AdjointMatchingConfig, AdjointMatchingSolver

    model, base, dim, batch = _models(shape, device)
    kwargs: dict[str, Any] = {"kl_weight": 1.0, "steps": STEPS}
    if fast is not None:
        kwargs["fast"] = fast
    if autocast is not None:
        kwargs["autocast"] = autocast
    solver = AdjointMatchingSolver(model, base, _reward_fn(objective, base, dim, device), AdjointMatchingConfig(**kwargs))
    optimiser = _adam(model, device)
    gen = torch.Generator(device=device).manual_seed(0)
    active = []

    def step() -> None:
        optimiser.zero_grad(set_to_none=True)
        result = solver.step(torch.randn(batch, dim, generator=gen, device=device), gen)
        result.loss.backward()
        optimiser.step()
        active.append(result.metrics["active_fraction"])

    ms = _median_ms(step, device, reps, warmup=3)
    return ms, float(active[-1])


def _floor_ms(shape: str, device: str, reps: int) -> float:
    """The reference step's network passes done plainly: K forwards, K forward+VJP, the loss's forward+backward."""
    from tfft.adjoint import select_time_steps

    model, base, dim, batch = _models(shape, device)
    optimiser = _adam(model, device)
    x = torch.randn(batch, dim, device=device)
    t = torch.full((batch,), 0.5, device=device)
    m = select_time_steps(STEPS).numel()
    x_loss, t_loss = x.repeat(m, 1), t.repeat(m)

    def passes() -> None:
        with torch.no_grad():
            for _ in range(STEPS):
                model(x, t)
        for _ in range(STEPS):
            xg = x.detach().requires_grad_(True)
            torch.autograd.grad(base(xg, t), xg, grad_outputs=x)
        optimiser.zero_grad(set_to_none=True)
        model(x_loss, t_loss).pow(2).mean().backward()
        optimiser.step()

    return _median_ms(passes, device, reps)


def _sampler_rate(shape: str, device: str, reps: int) -> float:
    from tfft.sampling import sample_sde

    model, _, dim, _ = _models(shape, device)
    n = (8192 if dim < 1000 else 1024) if device == "cuda" else 1024
    x0 = torch.randn(n, dim, device=device)
    return n / (_median_ms(lambda: sample_sde(model, x0, 100), device, reps) / 1000.0)


def _weighted_ms(shape: str, device: str, reps: int) -> float:
    from tfft.solvers import WeightedFlowMatchingSolver

    model, _, dim, batch = _models(shape, device)
    bank = torch.randn(20_000, dim, device=device)
    solver = WeightedFlowMatchingSolver(model, bank, torch.rand(20_000))
    optimiser = _adam(model, device)
    gen = torch.Generator(device=device).manual_seed(0)
    index_gen = torch.Generator().manual_seed(0)

    def step() -> None:
        optimiser.zero_grad(set_to_none=True)
        solver.step(batch, gen, index_generator=index_gen).loss.backward()
        optimiser.step()

    return _median_ms(step, device, reps)


def measure(device: str, shapes: list[str], reps: int, *, baseline_mode: bool = False) -> dict[str, Any]:
    """All timings of this process's `tfft` on `device`; ``baseline_mode`` times only the adjoint steps."""
    from tfft.solvers import AdjointMatchingConfig

    has_switch = "fast" in {f.name for f in dataclasses.fields(AdjointMatchingConfig)}
    out: dict[str, Any] = {}
    for shape in shapes:
        row: dict[str, Any] = {}
        for objective in ("tail", "mean"):
            if baseline_mode:
                row[f"{objective}_ms"], _ = _adjoint_step_ms(shape, device, objective, None, reps)
                continue
            row[f"{objective}_fast_ms"], row[f"{objective}_active"] = _adjoint_step_ms(shape, device, objective, True, reps)
            reference = False if has_switch else None
            row[f"{objective}_reference_ms"], _ = _adjoint_step_ms(shape, device, objective, reference, reps)
            row[f"{objective}_bf16_ms"], _ = _adjoint_step_ms(shape, device, objective, True, reps, torch.bfloat16)
        if not baseline_mode:
            row["floor_ms"] = _floor_ms(shape, device, reps)
            row["sampler_samples_per_s"] = _sampler_rate(shape, device, reps)
            row["weighted_ms"] = _weighted_ms(shape, device, reps)
        out[shape] = row
        print(f"[step_speed] {device} {shape}: " + ", ".join(f"{k} {v:.4g}" for k, v in row.items()), flush=True)
    return out


def _baseline(directory: str, device: str, shapes: list[str], reps: int) -> dict[str, Any]:
    """Run `measure` with DIR's `tfft` in a child process started in DIR (so that DIR comes first on the path)."""
    repo = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=str(repo))
    cmd = [sys.executable, "-m", "benchmarks.step_speed", "--child", "--device", device, "--reps", str(reps),
           "--shapes", json.dumps(shapes), "--matmul-precision", torch.get_float32_matmul_precision()]
    proc = subprocess.run(cmd, env=env, cwd=Path(directory).resolve(), capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"the baseline run in {directory} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _machine(device: str) -> dict[str, Any]:
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "device": device}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    where = m.get("gpu", f"CPU ({m['threads']} threads, {m['processor']})")
    lines = [
        f"# Fine-tuning step speed on {where}",
        "",
        f"torch {m['torch']}; float32 matmul precision '{result.get('matmul_precision', 'highest')}'"
        f"{' (TF32)' if result.get('matmul_precision') == 'high' else ''}; K = {STEPS} SDE steps; Adam step included; medians over {result['reps']} repetitions. "
        "Written by `python -m benchmarks.step_speed`. 'tail' is a right-tail objective at alpha 0.1, 'mean' the "
        "expected reward. The floor is the reference algorithm's network passes done plainly in the same process "
        "(K no-grad forwards, K forward+VJP, the loss's forward+backward, Adam). 'bf16' is the fast path with the "
        "network calls under bf16 autocast (`finetune.autocast: bfloat16`); its accuracy on the closed-form tests: "
        "`tests/tfft/test_adjoint.py::test_fine_tuned_mean_and_kl_reach_the_closed_form` (within 0.5% of the "
        "target, as in float32) and `tests/tfft/test_fast_path.py::test_bf16_autocast_on_a_tail_is_float32_within_bf16_rounding`.",
        "",
        "| model | batch | tail active | tail fast ms | tail bf16 ms | tail reference ms | mean fast ms | mean bf16 ms | "
        "mean reference ms | floor ms | tail fast / floor | mean fast / floor | SDE sampler samples/s (100 steps) | "
        "weighted FM ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for shape, row in result["current"].items():
        lines.append(
            f"| {shape} | {SHAPES[shape][3]} | {row['tail_active']:.0%} | {row['tail_fast_ms']:.1f} | "
            f"{row['tail_bf16_ms']:.1f} | {row['tail_reference_ms']:.1f} | {row['mean_fast_ms']:.1f} | "
            f"{row['mean_bf16_ms']:.1f} | {row['mean_reference_ms']:.1f} | "
            f"{row['floor_ms']:.1f} | {row['tail_fast_ms'] / row['floor_ms']:.2f} | "
            f"{row['mean_fast_ms'] / row['floor_ms']:.2f} | {row['sampler_samples_per_s']:,.0f} | {row['weighted_ms']:.1f} |"
        )
    if result.get("baseline"):
        lines += ["", f"Against the library in `{result['baseline_label']}` (same machine, same run):", "",
                  "| model | tail: baseline ms | tail: speed-up | tail: bf16 speed-up | mean: baseline ms | "
                  "mean: speed-up | mean: bf16 speed-up |", "|---|---|---|---|---|---|---|"]
        for shape, row in result["current"].items():
            old = result["baseline"][shape]
            lines.append(
                f"| {shape} | {old['tail_ms']:.1f} | {old['tail_ms'] / row['tail_fast_ms']:.2f}x | "
                f"{old['tail_ms'] / row['tail_bf16_ms']:.2f}x | {old['mean_ms']:.1f} | "
                f"{old['mean_ms'] / row['mean_fast_ms']:.2f}x | {old['mean_ms'] / row['mean_bf16_ms']:.2f}x |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--baseline", help="a directory holding another version of the `tfft` package")
    parser.add_argument("--baseline-label", help="how to name the baseline in the results (default: DIR)")
    parser.add_argument("--quick", action="store_true", help="3 repetitions instead of 7")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--matmul-precision", choices=["highest", "high"], default="highest",
                        help="torch.set_float32_matmul_precision for both runs ('high': TF32 matmuls on GPUs)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--shapes", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    torch.set_float32_matmul_precision(args.matmul_precision)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    reps = args.reps or (3 if args.quick else 7)
    shapes = json.loads(args.shapes) if args.shapes else (list(SHAPES) if device == "cuda" else CPU_SHAPES)
    if args.child:
        import tfft

        print(f"[step_speed] baseline library: {Path(tfft.__file__).parent}", file=sys.stderr)
        print(json.dumps(measure(device, shapes, reps, baseline_mode=True)))
        return 0
    result: dict[str, Any] = {"machine": _machine(device), "reps": reps, "steps": STEPS,
                              "matmul_precision": args.matmul_precision}
    if args.baseline:
        result["baseline"] = _baseline(args.baseline, device, shapes, reps)
        result["baseline_label"] = args.baseline_label or args.baseline
    result["current"] = measure(device, shapes, reps)
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"step_speed_{device}" + ("" if args.matmul_precision == "highest" else "_tf32")
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / f"{name}.md").write_text(_markdown(result))
    print(_markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
