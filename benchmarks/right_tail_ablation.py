"""Why right-tail adjoint-matching fine-tuning stops short of its target: a closed-form ablation (issue 10).

    python -m benchmarks.right_tail_ablation              # every variant, 2 processes of one thread each
    python -m benchmarks.right_tail_ablation --only "default;d=64"   # variants by name, ";"-separated

Base q = N(0, I_d) as the exact Gaussian flow v_base(x, t) = c(t) x plus a trainable correction (a small
`tfft.model.VelocityMLP` whose last layer starts at zero), reward r(x) = x_0, right CVaR at alpha = 0.1, KL
weight gamma. The target p* ∝ q exp(g / gamma), g = (x_0 - eta)_+ / alpha, is a two-piece Gaussian in x_0:
below eta the base N(0, 1), above it N(c, 1) with c = 1 / (alpha gamma), with masses Phi(eta) and
exp(c^2 / 2 - c eta)(1 - Phi(eta - c)). eta* solves P_{p*}(x_0 > eta) = alpha (bisection); then
R-CVaR(0.1) of p* = E[N(c, 1) | > eta*] and KL(p* || q) = c alpha (CVaR - eta*) - log Z, all closed form.

Every run fine-tunes with `tfft.solvers.AdjointMatchingSolver` (Adam, gradient-norm clip as the pipeline), then
draws fresh samples from the fine-tuned SDE (same K) and reports R-CVaR(0.1), the fraction of the gap closed
(fine-tuned - base) / (target - base), and the Girsanov KL of the evaluation paths.

The exact control. The base chain is linear Gaussian, X_{k+1} = A_k X_k + sqrt(Q_k) eps, so X_K | X_k = x is
N(M_k x, S_k) exactly, and h_k(x) = E[exp(g(X_K) / gamma) | X_k = x] = H(M_k x; S_k) with
H(mu; S) = Phi((eta - mu)/s) + exp(c (mu - eta) + c^2 S / 2) Phi((mu + c S - eta)/s). The drift change that
gives step k the mean of the optimally tilted transition is v - v_base = (sigma_k^2 / lambda_k) M_{k+1}
(log H)'(M_k x; S_k) on x_0: `ExactControl`. Its samples give the discretisation floor at K, and training
started from it (a zero correction on top) shows whether the adjoint-matching loss is at its minimum there.

Writes ``benchmarks/results/right_tail_ablation.md`` (and ``.json``).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from multiprocessing import Pool
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
ALPHA = 0.1

DEFAULTS: dict[str, Any] = {
    "d": 8, "kl_weight": 3.0, "steps": 40, "iterations": 600, "lr": 3e-3, "batch": 512, "grad_clip": 100.0,
    "hidden": 64, "seed": 0, "start": "base", "eval_n": 20_000, "checkpoints": 4,
    # AdjointMatchingConfig fields (the library's defaults)
    "clip_quantile": 0.9, "normalize": False, "late_fraction": 0.25, "n_early": 10, "oversample": 1,
    "reweight": False,
}
SOLVER_KEYS = ("clip_quantile", "normalize", "late_fraction", "n_early", "oversample", "reweight")

# name -> overrides of DEFAULTS: one thing at a time
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "d=1": {"d": 1},
    "d=64": {"d": 64},
    "iterations=2000": {"iterations": 2000},
    "lr=1e-3": {"lr": 1e-3},
    "lr=1e-2": {"lr": 1e-2},
    "clip_quantile=0": {"clip_quantile": 0.0},
    "normalize": {"normalize": True},
    "late_fraction=1": {"late_fraction": 1.0},
    "n_early=30": {"n_early": 30},
    "oversample=4": {"oversample": 4},
    "K=20": {"steps": 20},
    "K=100": {"steps": 100, "iterations": 300},
    "kl_weight=1": {"kl_weight": 1.0},
    "kl_weight=10": {"kl_weight": 10.0},
    "batch=128": {"batch": 128},
    "batch=2048": {"batch": 2048, "iterations": 300},
    "start=exact": {"start": "exact"},
    "start=exact, clip_quantile=0": {"start": "exact", "clip_quantile": 0.0},
    "reweight": {"reweight": True},
    "reweight, seed=1": {"reweight": True, "seed": 1},
    "reweight, d=64": {"reweight": True, "d": 64},
    "reweight, kl_weight=10": {"reweight": True, "kl_weight": 10.0},
    "reweight, iterations=2000": {"reweight": True, "iterations": 2000},
    "reweight, start=exact": {"reweight": True, "start": "exact"},
    "reweight, seed=2": {"reweight": True, "seed": 2},
    "seed=1": {"seed": 1},
    "seed=2": {"seed": 2},
}


# ---------------------------------------------------------------- closed forms


def _log_ndtr(z: float) -> float:
    return float(torch.special.log_ndtr(torch.tensor(z, dtype=torch.float64)))


@dataclass(frozen=True)
class Target:
    """The exact tilt of N(0, 1) by exp((x - eta)_+ / (alpha gamma)) at the exact eta* (module docstring)."""

    eta: float
    cvar: float
    kl: float
    base_cvar: float


def exact_target(kl_weight: float, alpha: float = ALPHA) -> Target:
    c = 1.0 / (alpha * kl_weight)

    def log_masses(eta: float) -> tuple[float, float]:
        return _log_ndtr(eta), c * c / 2 - c * eta + _log_ndtr(c - eta)

    lo, hi = -10.0, 10.0 + c
    for _ in range(200):  # the tail mass of p_eta decreases in eta
        eta = 0.5 * (lo + hi)
        below, above = log_masses(eta)
        mass = 1.0 / (1.0 + math.exp(below - above))
        lo, hi = (eta, hi) if mass > alpha else (lo, eta)
    eta = 0.5 * (lo + hi)
    below, above = log_masses(eta)
    z = eta - c
    cvar = c + math.exp(-0.5 * z * z - _log_ndtr(-z)) / math.sqrt(2 * math.pi)
    log_z = max(below, above) + math.log1p(math.exp(-abs(below - above)))
    kl = c * alpha * (cvar - eta) - log_z
    q = float(torch.special.ndtri(torch.tensor(1 - alpha, dtype=torch.float64)))
    base_cvar = math.exp(-0.5 * q * q) / math.sqrt(2 * math.pi) / alpha
    return Target(eta, cvar, kl, base_cvar)


def base_chain(steps: int) -> tuple[list[float], list[float], list[float], list[float]]:
    """(A_k, Q_k, M_k, S_k) of the base SDE chain on one coordinate, M_K = 1, S_K = 0 (module docstring)."""
    from tfft.model import gaussian_velocity_coefficient
    from tfft.sampling import step_coefficients

    c_x, c_v, c_n = step_coefficients(steps, 1.0 / steps)
    slope = [float(gaussian_velocity_coefficient(torch.tensor(k / steps, dtype=torch.float64))) for k in range(steps)]
    a = [c_x[k] + c_v[k] * slope[k] for k in range(steps)]
    q = [c * c for c in c_n]
    m, s = [1.0] * (steps + 1), [0.0] * (steps + 1)
    for k in range(steps - 1, -1, -1):
        m[k] = m[k + 1] * a[k]
        s[k] = m[k + 1] ** 2 * q[k] + s[k + 1]
    return a, q, m, s


class ExactControl(nn.Module):
    """v_base + the mean-matched optimal drift change on x_0 (module docstring); frozen, no parameters."""

    def __init__(self, steps: int, eta: float, kl_weight: float, alpha: float = ALPHA) -> None:
        super().__init__()
        from tfft.sampling import sigma, velocity_gain

        _, _, m, s = base_chain(steps)
        h = 1.0 / steps
        gain = [float(sigma(k * h, h)) ** 2 / float(velocity_gain(k * h, h)) * m[k + 1] for k in range(steps)]
        self.steps, self.eta, self.c = steps, eta, 1.0 / (alpha * kl_weight)
        self.register_buffer("gain", torch.tensor(gain, dtype=torch.float64))
        self.register_buffer("m", torch.tensor(m[:steps], dtype=torch.float64))
        self.register_buffer("s", torch.tensor(s[:steps], dtype=torch.float64))

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        from tfft.model import gaussian_velocity_coefficient

        k = torch.round(t.double() * self.steps).long().clamp(0, self.steps - 1)
        mu, var = self.m[k] * x[:, 0].double(), self.s[k]
        sd, c = var.sqrt(), self.c
        log_low = torch.special.log_ndtr((self.eta - mu) / sd)
        log_high = c * (mu - self.eta) + c * c * var / 2 + torch.special.log_ndtr((mu + c * var - self.eta) / sd)
        dlog = c * torch.exp(log_high - torch.logaddexp(log_low, log_high))  # (log H)'(mu)
        out = gaussian_velocity_coefficient(t)[:, None] * x
        shift = (self.gain[k] * dlog).to(x.dtype)
        return torch.cat([out[:, :1] + shift[:, None], out[:, 1:]], dim=1)


class Corrected(nn.Module):
    """v(x, t) = fixed(x, t) + MLP(x, t) with the MLP's last layer at zero: starts as ``fixed`` exactly."""

    def __init__(self, fixed: nn.Module, d: int, hidden: int) -> None:
        super().__init__()
        from tfft.model import VelocityMLP

        self.fixed = fixed
        self.correction = VelocityMLP(d, hidden=hidden, depth=2)
        nn.init.zeros_(self.correction.net[-1].weight)
        nn.init.zeros_(self.correction.net[-1].bias)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.fixed(x, t) + self.correction(x, t)


# ---------------------------------------------------------------- one run


def _evaluate(model: nn.Module, base: nn.Module, n: int, steps: int, seed: int) -> tuple[float, float]:
    """(R-CVaR(alpha) of x_0, Girsanov KL) on n fresh SDE samples of ``model``."""
    from tfft.sampling import sample_sde, sigma, velocity_gain
    from tfft.tail import cvar

    gen = torch.Generator().manual_seed(10_000 + seed)
    with torch.no_grad():
        traj = sample_sde(model, torch.randn(n, model_dim(model), generator=gen), steps, generator=gen,
                          return_trajectory=True)
        kl = torch.zeros(n, dtype=torch.float64)
        for k in range(steps):
            t = k * traj.h
            u = velocity_gain(t, traj.offset) / sigma(t, traj.offset) * (
                traj.velocities[k] - base(traj.xs[k], traj.ts[k].expand(n)))
            kl += 0.5 * traj.h * u.double().pow(2).sum(dim=1)
    return cvar(traj.x1[:, 0].double().numpy(), side="right", alpha=ALPHA), float(kl.mean())


def model_dim(model: nn.Module) -> int:
    return int(model.correction.config["dim"])


def run(overrides: dict[str, Any]) -> dict[str, Any]:
    """Fine-tune once with DEFAULTS | overrides; returns the settings, the results and the CVaR along the way."""
    from tfft.model import GaussianVelocity
    from tfft.pseudo import pseudo_reward_signal
    from tfft.solvers import AdjointMatchingConfig, AdjointMatchingSolver

    torch.set_num_threads(1)
    cfg = {**DEFAULTS, **overrides}
    started = time.perf_counter()
    torch.manual_seed(cfg["seed"])
    d, steps, gamma = cfg["d"], cfg["steps"], cfg["kl_weight"]
    target = exact_target(gamma)
    base = GaussianVelocity()
    fixed = ExactControl(steps, target.eta, gamma) if cfg["start"] == "exact" else GaussianVelocity()
    model = Corrected(fixed, d, cfg["hidden"])

    def signal(x1: Tensor):
        grad = torch.zeros_like(x1)
        grad[:, 0] = 1.0
        return pseudo_reward_signal(x1[:, 0], grad, torch.ones(len(x1), dtype=torch.bool), eta=target.eta,
                                    side="right", alpha=ALPHA)

    solver = AdjointMatchingSolver(model, base, signal, AdjointMatchingConfig(
        kl_weight=gamma, steps=steps, **{k: cfg[k] for k in SOLVER_KEYS}))
    opt = torch.optim.Adam(model.correction.parameters(), lr=cfg["lr"])
    gen = torch.Generator().manual_seed(cfg["seed"] + 1)
    start_cvar, start_kl = _evaluate(model, base, 5_000, steps, cfg["seed"])
    path = [(0, start_cvar)]
    every = max(cfg["iterations"] // cfg["checkpoints"], 1)
    ratios, clipped, active, grad_hits = [], [], [], 0
    for it in range(1, cfg["iterations"] + 1):
        result = solver.step(torch.randn(cfg["batch"], d, generator=gen), gen)
        opt.zero_grad()
        result.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.correction.parameters(), cfg["grad_clip"])
        grad_hits += int(float(norm) > cfg["grad_clip"])
        opt.step()
        m = result.metrics
        if it > cfg["iterations"] // 2:
            ratios.append(float(m["loss"]) / max(float(m["loss_at_base"]), 1e-30))
            clipped.append(float(m["clipped_fraction"]))
            active.append(float(m["active_fraction"]))
        if it % every == 0 and it < cfg["iterations"]:
            path.append((it, _evaluate(model, base, 5_000, steps, cfg["seed"])[0]))
    final, kl = _evaluate(model, base, cfg["eval_n"], steps, cfg["seed"])
    path.append((cfg["iterations"], final))
    half = max(len(ratios), 1)
    return {
        "settings": cfg, "target": target.__dict__, "start_cvar": start_cvar, "start_kl": start_kl,
        "cvar": final, "kl": kl, "gap_closed": (final - target.base_cvar) / (target.cvar - target.base_cvar),
        "path": path, "loss_ratio": sum(ratios) / half, "clipped_fraction": sum(clipped) / half,
        "active_fraction": sum(active) / half, "grad_clip_hits": grad_hits, "seconds": time.perf_counter() - started,
    }


def _job(item: tuple[str, dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    name, overrides = item
    out = run(overrides)
    print(f"{name}: gap closed {out['gap_closed']:.2f}, R-CVaR {out['cvar']:.3f} / {out['target']['cvar']:.3f}, "
          f"{out['seconds']:.0f} s", flush=True)
    return name, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help="\";\"-separated variant names (default: all)")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "right_tail_ablation"))
    args = parser.parse_args()
    names = [n for n in args.only.split(";") if n] if args.only else list(VARIANTS)
    with Pool(args.processes) as pool:
        rows = dict(pool.map(_job, [(n, VARIANTS[n]) for n in names]))
    path = Path(args.out + ".json")
    if args.only and path.exists():  # a partial rerun updates its rows
        rows = {**json.loads(path.read_text()), **rows}
    path.write_text(json.dumps(rows, indent=1))
    md = Path(args.out + ".md")  # the diagnosis above the table is written by hand: keep it
    head = md.read_text().split("## Runs")[0] + "## Runs\n\n" if md.exists() else ""
    md.write_text(head + table(rows))


def table(rows: dict[str, dict[str, Any]]) -> str:
    """The markdown table of the runs: variant, gap closed, R-CVaR along training, target, KL."""
    lines = ["| variant | gap closed | final R-CVaR(0.1) | R-CVaR at the checkpoints | target | KL (target) | "
             "active fraction | s |", "|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        t = r["target"]
        path = " → ".join(f"{c:.2f}" for _, c in r["path"])
        lines.append(f"| {name} | {r['gap_closed']:.2f} | {r['cvar']:.3f} | {path} | {t['cvar']:.3f} | "
                     f"{r['kl']:.3f} ({t['kl']:.3f}) | {r['active_fraction']:.3f} | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"
    print(json.dumps({n: round(r["gap_closed"], 3) for n, r in rows.items()}))


if __name__ == "__main__":
    main()
