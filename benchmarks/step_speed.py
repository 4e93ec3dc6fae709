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
  commit), in a child process on the same machine, so that "faster than before" is a ratio from one run. The
  comparison runs in ``--rounds`` rounds (default 3), each timing DIR's steps and then this library's fast steps
  (float32 and bf16); a speed-up is the median of the rounds' ratios, shown with their range, so that a
  neighbour's load on a shared machine during one round moves one ratio, not the result;
- on CPU, the matrix-product work of each step (``torch.utils.flop_counter``, forward and backward: the
  products are nearly all of a small MLP's arithmetic) and this machine's rate for products of the model's own
  shape (batch x hidden by hidden x hidden), measured in the same process. Their quotient is the least time the
  step's arithmetic can take in float32 here, whatever its loops cost: a step already near it can only get
  faster by doing less arithmetic (or by doing it in bf16).

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


def _flops(fn: Any) -> float:
    """Floating-point operations of the matrix products in one call of ``fn`` (forward and backward), by
    torch's own per-operator formulas (`torch.utils.flop_counter`'s registry). A plain dispatch mode: the
    library's `FlopCounterMode` also tracks modules with hooks that ``torch.autograd.grad`` on a leaf rejects."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import flop_registry

    class Count(TorchDispatchMode):
        total = 0.0

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            formula = flop_registry.get(func._overloadpacket)
            if formula is not None:
                self.total += formula(*args, **kwargs, out_val=out)
            return out

    with Count() as counter:
        fn()
    return float(counter.total)


def _gemm_gflops(shape: str, device: str, reps: int) -> float:
    """This process's rate (GFLOP/s) for the model's hidden-layer product, (batch, hidden) @ (hidden, hidden): the
    best of at least 15 timings (a ceiling: another process on the machine only ever slows a timing down)."""
    _, hidden, _, batch = SHAPES[shape]
    a, b = torch.randn(batch, hidden, device=device), torch.randn(hidden, hidden, device=device)
    inner = 20  # products per timing: one product of the 2-D MLP takes tens of microseconds

    def products() -> None:
        for _ in range(inner):
            a @ b

    best = min(_median_ms(products, device, 1, warmup=0 if k else 2) for k in range(max(reps, 15)))
    return inner * 2.0 * batch * hidden * hidden / (best * 1e6)


@dataclasses.dataclass(frozen=True)
class StepTiming:
    """One solver step's median ms, the active fraction of its last step, and on CPU in float32 its
    matrix-product work (`_flops`, counted on one more step after the timing; None elsewhere)."""

    ms: float
    active: float
    flops: float | None


def _adjoint_step_ms(shape: str, device: str, objective: str, fast: bool | None, reps: int,
                     autocast: torch.dtype | None = None, *, count_work: bool = True) -> StepTiming:
    """One solver step, backward and Adam step, timed (`StepTiming`; ``count_work`` False: no work counted).

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
    flops = _flops(step) if count_work and device == "cpu" and autocast is None else None
    return StepTiming(ms, float(active[-1]), flops)


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


def _record(row: dict[str, Any], prefix: str, timing: StepTiming) -> None:
    """``row[prefix_ms]`` and, when counted, ``row[prefix_flops]``."""
    row[f"{prefix}_ms"] = timing.ms
    if timing.flops is not None:
        row[f"{prefix}_flops"] = timing.flops


def measure(device: str, shapes: list[str], reps: int, *, baseline_mode: bool = False) -> dict[str, Any]:
    """All timings of this process's `tfft` on `device`; ``baseline_mode`` times only the adjoint steps."""
    from tfft.solvers import AdjointMatchingConfig

    has_switch = "fast" in {f.name for f in dataclasses.fields(AdjointMatchingConfig)}
    out: dict[str, Any] = {}
    for shape in shapes:
        row: dict[str, Any] = {}
        for objective in ("tail", "mean"):
            if baseline_mode:
                _record(row, objective, _adjoint_step_ms(shape, device, objective, None, reps))
                continue
            fast = _adjoint_step_ms(shape, device, objective, True, reps)
            _record(row, f"{objective}_fast", fast)
            row[f"{objective}_active"] = fast.active
            reference = False if has_switch else None
            _record(row, f"{objective}_reference", _adjoint_step_ms(shape, device, objective, reference, reps))
            _record(row, f"{objective}_bf16", _adjoint_step_ms(shape, device, objective, True, reps, torch.bfloat16))
        if not baseline_mode:
            row["floor_ms"] = _floor_ms(shape, device, reps)
            row["sampler_samples_per_s"] = _sampler_rate(shape, device, reps)
            row["weighted_ms"] = _weighted_ms(shape, device, reps)
            if device == "cpu":
                row["gemm_gflops"] = _gemm_gflops(shape, device, reps)
        out[shape] = row
        print(f"[step_speed] {device} {shape}: " + ", ".join(f"{k} {v:.4g}" for k, v in row.items()), flush=True)
    return out


def _fast_steps(device: str, shapes: list[str], reps: int) -> dict[str, Any]:
    """This library's fast steps, float32 and bf16, for one comparison round: {shape: {name: ms}}."""
    out: dict[str, Any] = {}
    for shape in shapes:
        out[shape] = {}
        for objective in ("tail", "mean"):
            for suffix, autocast in (("", None), ("_bf16", torch.bfloat16)):
                timing = _adjoint_step_ms(shape, device, objective, True, reps, autocast, count_work=False)
                out[shape][f"{objective}{suffix}_ms"] = timing.ms
    return out


def _compare(directory: str, device: str, shapes: list[str], reps: int, rounds: int) -> dict[str, Any]:
    """``rounds`` rounds of DIR's steps then this library's fast steps; per shape the median baseline times
    (``tail_ms``, ``mean_ms``, the work counted in the first round) and each speed-up's median and range."""
    runs = []
    for k in range(rounds):
        runs.append({"baseline": _baseline(directory, device, shapes, reps), "current": _fast_steps(device, shapes, reps)})
        print(f"[step_speed] comparison round {k + 1}/{rounds}: {json.dumps(runs[-1])}", flush=True)
    out: dict[str, Any] = {}
    for shape in shapes:
        row = dict(runs[0]["baseline"][shape])
        for objective in ("tail", "mean"):
            row[f"{objective}_ms"] = statistics.median(r["baseline"][shape][f"{objective}_ms"] for r in runs)
            for suffix in ("", "_bf16"):
                ratios = [r["baseline"][shape][f"{objective}_ms"] / r["current"][shape][f"{objective}{suffix}_ms"]
                          for r in runs]
                row[f"{objective}{suffix}_speedup"] = {"median": statistics.median(ratios), "min": min(ratios),
                                                      "max": max(ratios)}
        out[shape] = row
    return {"summary": out, "rounds": runs}


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
        lines += ["", f"Against the library in `{result['baseline_label']}` (same machine, same run; "
                  f"{result.get('rounds', 1)} rounds, each timing the baseline's steps and then this library's: "
                  "baseline ms is the median over the rounds, a speed-up the median of the rounds' ratios with "
                  "their range):", "",
                  "| model | tail: baseline ms | tail: speed-up | tail: bf16 speed-up | mean: baseline ms | "
                  "mean: speed-up | mean: bf16 speed-up |", "|---|---|---|---|---|---|---|"]
        for shape, row in result["current"].items():
            old = result["baseline"][shape]
            lines.append(
                f"| {shape} | {old['tail_ms']:.1f} | {_speedup(old, 'tail')} | {_speedup(old, 'tail_bf16')} | "
                f"{old['mean_ms']:.1f} | {_speedup(old, 'mean')} | {_speedup(old, 'mean_bf16')} |"
            )
    return "\n".join(lines + _arithmetic_lines(result)) + "\n"


def _speedup(old: dict[str, Any], name: str) -> str:
    """A comparison's speed-up, 'median (min-max)x' over the rounds."""
    ratio = old[f"{name}_speedup"]
    return f"{ratio['median']:.2f}x ({ratio['min']:.2f}-{ratio['max']:.2f})"


def _arithmetic_lines(result: dict[str, Any]) -> list[str]:
    """The table of each step's matrix-product work against this machine's rate for the model's products (CPU)."""
    rows = [(shape, row) for shape, row in result["current"].items() if "gemm_gflops" in row]
    if not rows:
        return []
    old = result.get("baseline") or {}
    lines = [
        "", "Arithmetic (float32): the matrix-product work of one step (forward and backward, "
        "`torch.utils.flop_counter`) and this machine's rate for the model's hidden-layer product "
        "(batch x hidden by hidden x hidden) measured in the same run (the best of 15 timings). 'least ms' is the work divided by that "
        "rate: what the step's products take if they run at the rate the same products reach when done plainly, "
        "whatever the loops around them cost.", "",
        "| model | objective | GFLOP: baseline | GFLOP: reference | GFLOP: fast | product rate GFLOP/s | "
        "fast: achieved GFLOP/s | fast: least ms | fast ms | baseline ms / 1.5 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for shape, row in rows:
        rate = row["gemm_gflops"]
        for objective in ("tail", "mean"):
            fast = row.get(f"{objective}_fast_flops")
            if fast is None:
                continue
            before = old.get(shape, {})
            base_flops = before.get(f"{objective}_flops")
            base_ms = before.get(f"{objective}_ms")
            ms = row[f"{objective}_fast_ms"]
            lines.append(
                f"| {shape} | {objective} | {'n/a' if base_flops is None else f'{base_flops / 1e9:.2f}'} | "
                f"{row[f'{objective}_reference_flops'] / 1e9:.2f} | {fast / 1e9:.2f} | {rate:.0f} | "
                f"{fast / (ms * 1e6):.0f} | {fast / (rate * 1e6):.1f} | {ms:.1f} | "
                f"{'n/a' if base_ms is None else f'{base_ms / 1.5:.1f}'} |"
            )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--baseline", help="a directory holding another version of the `tfft` package")
    parser.add_argument("--baseline-label", help="how to name the baseline in the results (default: DIR)")
    parser.add_argument("--rounds", type=int, default=3, help="comparison rounds against --baseline")
    parser.add_argument("--quick", action="store_true", help="3 repetitions instead of 7")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--matmul-precision", choices=["highest", "high"], default="highest",
                        help="torch.set_float32_matmul_precision for both runs ('high': TF32 matmuls on GPUs)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--shapes", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
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
    result["current"] = measure(device, shapes, reps)
    if args.baseline:
        compared = _compare(args.baseline, device, shapes, reps, args.rounds)
        result["baseline"], result["comparison_rounds"] = compared["summary"], compared["rounds"]
        result["baseline_label"], result["rounds"] = args.baseline_label or args.baseline, args.rounds
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"step_speed_{device}" + ("" if args.matmul_precision == "highest" else "_tf32")
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / f"{name}.md").write_text(_markdown(result))
    print(_markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
