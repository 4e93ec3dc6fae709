"""Two bank estimators for a right tail decided at the sampler's last steps, against the base and the exact target.

    python -m benchmarks.bank_estimators            # alanine dipeptide, seed 0, about 6 minutes
    python -m benchmarks.bank_estimators --quick    # a bank of 600 and 100 steps (smoke)

One process, no Ray: prototypes for the solver issue's notes, not pipeline solvers. The base model of
``tune_configs/molecule_right.yaml`` draws a bank of N trajectories of the 60-step law-preserving SDE, keeping
their states X_k and Brownian increments eps_k; GFN1-xTB scores (and differentiates) every end point once. With
the bank's threshold eta* and tilt rho_i = w_i / median(w) (w_i ∝ exp(g(X_K^i) / gamma)), each estimator fits a
copy of the base model by regression on the bank alone, rows with rho != 1 drawn for half of each batch (weighted
by their bank share), u = (lambda_k / sigma_k)(v_theta - v_base)(X_k, t_k):

- **transitions**: sum rho h ||u||^2 - 2 (rho - 1) sqrt(h) u . eps_k, whose minimiser is E*[eps_k | X_k] / sqrt(h):
  the tilted path law's transition means, the M-projection of p* on Gaussian-transition samplers;
- **bank adjoint**: sum rho ||u + sigma_k a_k||^2 with a_k the lean adjoint (``tfft.adjoint.lean_adjoint``) of
  each bank path from a_K = -grad g(X_K) / gamma: off-policy adjoint matching, whose minimiser
  E[w (-sigma a) | X_k] / E[w | X_k] = sigma grad log E[w | X_k] is the exact discrete Doob control, with the
  reward's gradient computed once per bank row.

Both models and the base are evaluated on the same fresh noise (common random numbers). Writes
``benchmarks/results/bank_estimators.{md,json}``.
"""

from __future__ import annotations

import argparse
import copy
import time
from typing import Any, Callable

import numpy as np
import torch

from benchmarks.molecule_lab import RESULTS, molecule_setup, write_results

K, ALPHA_EVAL = 60, 0.1


def _bank(base: Any, reward: Any, n: int, dim: int, seed: int) -> dict[str, Any]:
    """n base trajectories (states, increments) and their end points' rewards, validity and reward gradients."""
    from tfft.sampling import sample_sde

    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, dim, generator=g)
    eps = torch.randn(K, n, dim, generator=g)
    with torch.no_grad():
        xs = sample_sde(base, x0, K, noise=eps, return_trajectory=True).xs
    out, grad = reward.evaluate_with_grad(xs[-1].double())
    return {"xs": xs, "eps": eps, "r": out.rewards.numpy(), "v": out.valid.numpy().astype(bool),
            "grad": torch.nan_to_num(grad.float())}


def _tilt(bank: dict[str, Any], cfg: Any) -> dict[str, Any]:
    from tfft.tail import cvar, solve_threshold
    from tfft.target import tilt_weights

    side, alpha, gamma = cfg.objective.side, cfg.objective.alpha, cfg.objective.kl_weight
    r, v = bank["r"], bank["v"]
    eta = solve_threshold(r, side=side, alpha=alpha, kl_weight=gamma, valid=v).eta
    w = tilt_weights(r, eta=eta, side=side, alpha=alpha, kl_weight=gamma, valid=v)
    rho = torch.tensor(w / np.median(w[w > 0]), dtype=torch.float32)
    active = torch.tensor(np.isfinite(r) & v & ((r > eta) if side == "right" else (r < eta)))
    return {"eta": float(eta), "rho": rho, "active": active, "alpha": alpha, "gamma": gamma, "side": side,
            "target": float(cvar(r[v], side=side, alpha=ALPHA_EVAL, weights=w[v] / w[v].sum())),
            "bank": float(cvar(r[v], side=side, alpha=ALPHA_EVAL))}


def _adjoint_targets(base: Any, bank: dict[str, Any], tilt: dict[str, Any], clip: float) -> torch.Tensor:
    """-sigma_k a_k for every bank path, (K, N, d); a_K = -grad g / gamma on the active rows, 0 elsewhere."""
    from tfft.adjoint import lean_adjoint
    from tfft.sampling import Trajectory, sigma

    grad = bank["grad"]  # grad r, each row's norm capped at clip; grad g = 1{active} grad r / alpha on either side
    grad = grad * (clip / grad.norm(dim=1, keepdim=True).clamp_min(1e-12)).clamp(max=1.0)
    terminal = torch.where(tilt["active"][:, None], -grad / tilt["alpha"] / tilt["gamma"], torch.zeros_like(grad))
    h = 1.0 / K
    ts = torch.arange(K + 1) * h
    states = torch.cat([lean_adjoint(base, Trajectory(xs=bank["xs"][:, s:s + 500], ts=ts, h=h, offset=h),
                                     terminal[s:s + 500]).states for s in range(0, terminal.shape[0], 500)], dim=1)
    return -(sigma(ts[:K], h)[:, None, None] * states[:K])


def _fit(base: Any, bank: dict[str, Any], tilt: dict[str, Any], loss_of: Callable[..., torch.Tensor],
         steps: int, lr: float, seed: int) -> Any:
    """A copy of the base fitted by sum share * ``loss_of(u, rows, k, h)`` on stratified batches of 256 (cosine
    lr); ``loss_of`` returns each row's term, its tilt rho included."""
    from tfft.sampling import sigma, velocity_gain

    model = copy.deepcopy(base).train()
    for p in model.parameters():
        p.requires_grad_(True)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    h = 1.0 / K
    ts = torch.arange(K) * h
    gain = velocity_gain(ts, h) / sigma(ts, h)
    active = torch.nonzero(tilt["active"]).flatten()
    rest = torch.nonzero(~tilt["active"] & torch.tensor(bank["v"])).flatten()
    n_all, half = len(active) + len(rest), 128
    share = torch.cat([torch.full((half,), len(active) / n_all / half), torch.full((half,), len(rest) / n_all / half)])
    g = torch.Generator().manual_seed(seed)
    for it in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1.0 + np.cos(np.pi * it / steps))
        rows = torch.cat([active[torch.randint(len(active), (half,), generator=g)],
                          rest[torch.randint(len(rest), (half,), generator=g)]])
        k = torch.randint(K, (2 * half,), generator=g)
        x, t = bank["xs"][k, rows], ts[k]
        with torch.no_grad():
            v_base = base(x, t)
        u = gain[k][:, None] * (model(x, t) - v_base)
        loss = (share * loss_of(u, rows, k, h)).sum()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 100.0)
        opt.step()
    return model.eval()


def run(args: argparse.Namespace) -> dict[str, Any]:
    from tfft.sampling import sample_sde
    from tfft.tail import cvar

    from pipelines.models import build_model

    torch.set_num_threads(args.threads)
    cfg, base_model, reward = molecule_setup(args.seed)
    base = build_model(base_model.config, base_model.state_dict).eval()
    for p in base.parameters():
        p.requires_grad_(False)
    dim = int(base_model.config["dim"])
    started = time.time()
    bank = _bank(base, reward, args.n, dim, args.seed + 7)
    tilt = _tilt(bank, cfg)
    targets = _adjoint_targets(base, bank, tilt, args.reward_grad_clip)
    eps, rho = bank["eps"], tilt["rho"]
    losses = {
        "transitions": lambda u, rows, k, h: (rho[rows] * h * u.pow(2).sum(1) - 2 * (rho[rows] - 1) * h**0.5
                                              * (u * eps[k, rows]).sum(1)),
        "bank adjoint": lambda u, rows, k, h: rho[rows] * (u - targets[k, rows]).pow(2).sum(1),
    }
    g = torch.Generator().manual_seed(args.seed + 99)
    x0, noise = torch.randn(args.eval_n, dim, generator=g), torch.randn(K, args.eval_n, dim, generator=g)
    table = {}
    for name, model in [("base", base)] + [(n, _fit(base, bank, tilt, f, args.steps, args.lr, args.seed))
                                          for n, f in losses.items()]:
        with torch.no_grad():
            out = reward.evaluate(sample_sde(model, x0, K, noise=noise).double())
        r, v = out.rewards.numpy(), out.valid.numpy().astype(bool)
        table[name] = {"statistic": float(cvar(r[v], side=tilt["side"], alpha=ALPHA_EVAL)),
                       "validity": float(v.mean())}
    for row in table.values():
        row["gap_closed"] = (row["statistic"] - table["base"]["statistic"]) / (tilt["target"] - tilt["bank"])
    return {"seed": args.seed, "bank": args.n, "steps": args.steps, "lr": args.lr, "eval": args.eval_n,
            "side": tilt["side"], "eta": tilt["eta"], "active": int(tilt["active"].sum()),
            "bank_statistic": tilt["bank"], "target": tilt["target"], "rows": table,
            "minutes": (time.time() - started) / 60}


def _table(result: dict[str, Any]) -> str:
    side = "R" if result["side"] == "right" else "L"
    lines = [
        "# Bank estimators for a right tail decided at the last steps (alanine dipeptide, GFN1-xTB)",
        "",
        f"Written by `python -m benchmarks.bank_estimators` in {result['minutes']:.1f} min. Seed {result['seed']}, "
        f"a bank of {result['bank']} base trajectories (60-step SDE) of `tune_configs/molecule_right.yaml`'s base "
        f"model, {result['active']} of them in the tail (eta* {result['eta']:.2f}); {result['steps']} steps of "
        f"batch 256 at lr {result['lr']:g} (cosine); evaluation on {result['eval']} samples with the same noise "
        f"for every model. {side}-CVaR(0.1) on the bank {result['bank_statistic']:.2f}, exact target "
        f"{result['target']:.2f}; gap closed = (model - base) / (target - bank), both on the evaluation noise and "
        "the bank respectively. Prototypes, not pipeline solvers (module docstring).",
        "",
        f"| model | {side}-CVaR(0.1) | gap closed | validity % |",
        "|---|---|---|---|",
    ]
    for name, row in result["rows"].items():
        lines.append(f"| {name} | {row['statistic']:.2f} | {100 * row['gap_closed']:.0f}% | {100 * row['validity']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n", type=int, default=5000, help="bank trajectories")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval-n", type=int, default=2000)
    parser.add_argument("--reward-grad-clip", type=float, default=300.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="a bank of 600, 100 steps, 300 evaluation samples")
    parser.add_argument("--results", default=str(RESULTS / "bank_estimators"), help="output stem")
    args = parser.parse_args()
    if args.quick:
        args.n, args.steps, args.eval_n = 600, 100, 300
    result = run(args)
    write_results(args.results, result, _table(result))


if __name__ == "__main__":
    main()
