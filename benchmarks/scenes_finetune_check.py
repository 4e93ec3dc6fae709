"""A direct check, before the pipeline carries conditions, that fine-tuning can move the scenes task's tails.

    python -m benchmarks.scenes_base --save runs/scenes_base.pt       # the pretrained base network
    python -m benchmarks.scenes_finetune_check --base runs/scenes_base.pt --prompt "a red disc"

For one prompt, with the library alone (the pipeline's stages, condensed): a bank of ``--bank`` SDE samples of
the base model, the exact threshold for right- and left-CVaR(0.1) (and the expected reward with ``--mean``) at the
config's ``kl_weight``, ``finetune.steps`` adjoint-matching steps of ``finetune.batch_size`` trajectories
(``finetune.oversample`` times as many drawn; Adam at ``finetune.lr`` after a linear warm-up, gradient norm clipped at ``finetune.grad_clip``), then
``--eval`` fresh samples: mean reward, R-CVaR(0.1), L-CVaR(0.1), tail (r > 4) and failure (r < -2) shares, next
to the base model's and the exact target's (self-normalised weights on the bank). Appends to
``benchmarks/results/scenes_finetune_check.md``.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from rewards.scenes import FAILURE_LEVEL, TAIL_LEVEL, SceneReward
from tfft.conv_model import ConvVelocity
from tfft.pseudo import pseudo_reward_signal
from tfft.sampling import sample_sde
from tfft.solvers import AdjointMatchingConfig, AdjointMatchingSolver
from tfft.tail import cvar, solve_threshold
from tfft.target import target_summary

ROOT = Path(__file__).resolve().parents[1]


class PromptVelocity(torch.nn.Module):
    """The flat velocity v(x (n, 768), t (n,)) of a conditional network for one fixed prompt."""

    def __init__(self, network: ConvVelocity, prompt: str) -> None:
        super().__init__()
        self.network, self.prompt = network, prompt

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.network(x.reshape(x.shape[0], 3, 16, 16), t, self.prompt).reshape(x.shape[0], -1)


def draw(velocity: PromptVelocity, n: int, steps: int, gen: torch.Generator, reward: SceneReward) -> np.ndarray:
    """Rewards of n SDE samples, in chunks of 500."""
    out = []
    for start in range(0, n, 500):
        m = min(500, n - start)
        with torch.no_grad():
            x = sample_sde(velocity, torch.randn(m, 768, generator=gen), steps, generator=gen)
        out.append(reward.evaluate(x.double(), velocity.prompt).rewards.numpy())
    return np.concatenate(out)


def stats(r: np.ndarray) -> dict[str, float]:
    return {"mean": float(r.mean()), "R-CVaR(0.1)": cvar(r, side="right", alpha=0.1),
            "L-CVaR(0.1)": cvar(r, side="left", alpha=0.1), "tail %": 100 * float((r > TAIL_LEVEL).mean()),
            "failure %": 100 * float((r < FAILURE_LEVEL).mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "tune_configs" / "scenes_right.yaml"))
    parser.add_argument("--base", required=True, help="state dict of the pretrained ConvVelocity")
    parser.add_argument("--prompt", default="a red disc")
    parser.add_argument("--bank", type=int, default=2000)
    parser.add_argument("--eval", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=0, help="fine-tuning steps (0: the config's)")
    parser.add_argument("--sides", nargs="+", default=["right", "left"], choices=["right", "left"])
    parser.add_argument("--mean", action="store_true", help="also the expected-reward objective")
    parser.add_argument("--oversample", type=int, default=0, help="finetune.oversample (0: the config's)")
    parser.add_argument("--lr", type=float, default=0.0, help="finetune.lr (0: the config's)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scenes_finetune_check.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = OmegaConf.to_container(OmegaConf.load(args.config), resolve=True)
    ft = {"steps": 600, "batch_size": 512, "lr": 3e-3, "warmup_steps": 20, "grad_clip": 100.0, "oversample": 1,
          **cfg.get("finetune", {})}
    oversample = args.oversample or int(ft["oversample"])
    ft["lr"] = args.lr or float(ft["lr"])
    steps = args.steps or int(ft["steps"])
    kl_weight, alpha, sde_steps = float(cfg["objective"]["kl_weight"]), 0.1, int(cfg["sampler"]["steps"])
    reward = SceneReward(**cfg["reward"].get("kwargs", {}))
    net = ConvVelocity(**cfg["model"].get("kwargs", {}), conditions=list(cfg["data"]["conditions"]))
    net.load_state_dict(torch.load(args.base, weights_only=True))
    net.requires_grad_(False)
    base = PromptVelocity(net, args.prompt)
    gen = torch.Generator().manual_seed(0)
    started = time.time()
    bank = draw(base, args.bank, sde_steps, gen, reward)
    rows = {"base": stats(draw(base, args.eval, sde_steps, gen, reward))}
    objectives = [(side, side, alpha) for side in args.sides] + ([("mean", "right", 1.0)] if args.mean else [])
    for name, side, a in objectives:
        th = None if name == "mean" else solve_threshold(bank, side=side, alpha=a, kl_weight=kl_weight)
        eta = None if th is None else th.eta
        target = target_summary(bank, eta=eta, side=side, alpha=a, kl_weight=kl_weight)

        def signal(x1: torch.Tensor, side=side, a=a, eta=eta):
            batch, grad = reward.evaluate_with_grad(x1.double(), args.prompt)
            return pseudo_reward_signal(batch.rewards.float(), grad.float(), batch.valid, eta=eta, side=side, alpha=a)

        model = PromptVelocity(copy.deepcopy(net).requires_grad_(True), args.prompt)
        solver = AdjointMatchingSolver(model, base, signal, AdjointMatchingConfig(kl_weight=kl_weight, steps=sde_steps,
                                                                                 oversample=oversample))
        opt = torch.optim.Adam(model.parameters(), lr=float(ft["lr"]))
        t0 = time.time()
        for step in range(steps):
            for group in opt.param_groups:
                group["lr"] = float(ft["lr"]) * min(1.0, (step + 1) / max(int(ft["warmup_steps"]), 1))
            result = solver.step(torch.randn(int(ft["batch_size"]), 768, generator=gen), generator=gen)
            opt.zero_grad(set_to_none=True)
            result.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), float(ft["grad_clip"]))
            opt.step()
        model.requires_grad_(False)
        rows[f"{name} (eta {eta if eta is None else round(eta, 2)}, {time.time() - t0:.0f} s)"] = stats(
            draw(model, args.eval, sde_steps, gen, reward))
        rows[f"{name}: exact target on the bank"] = {
            "mean": target.mean, "R-CVaR(0.1)": target.cvar_right["0.1"], "L-CVaR(0.1)": target.cvar_left["0.1"],
            "tail %": float("nan"), "failure %": float("nan")}
    keys = list(rows["base"])
    lines = [f"## {args.prompt!r}: {steps} adjoint-matching steps of batch {ft['batch_size']} (oversample {oversample}, lr {ft['lr']:g}), "
             f"kl_weight {kl_weight}, "
             f"SDE {sde_steps} steps, bank {args.bank}, {args.eval} evaluation samples ({time.time() - started:.0f} s "
             f"in all, {args.threads} torch thread(s))", "",
             "| model | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    lines += [f"| {label} | " + " | ".join(f"{v[k]:.2f}" for k in keys) + " |" for label, v in rows.items()]
    text = "\n".join(lines) + "\n\n"
    out = Path(args.out)
    header = ("# Scenes task: fine-tuning one prompt with the library (before the condition axis)\n\n"
              "Written by `python -m benchmarks.scenes_finetune_check`; see its docstring.\n\n")
    out.write_text((out.read_text() if out.is_file() else header) + text)
    print(text)


if __name__ == "__main__":
    main()
