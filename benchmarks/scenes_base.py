"""The scenes task's base model, measured once: is it good enough for fine-tuning to act on?

    python -m benchmarks.scenes_base                 # the settings of tune_configs/scenes_right.yaml
    python -m benchmarks.scenes_base --steps 300     # a shorter pretraining (smoke)

Pretrains ``tfft.conv_model.ConvVelocity`` by conditional flow matching on ``rewards.scenes.sample_scenes``
with the config's ``model.kwargs`` and ``pretrain`` settings (``pretrain.n_samples`` images per prompt), in one
process with plain torch (the pipeline's pretraining stage gets the prompts with the condition axis), then
draws ``--n`` images per prompt with the Euler ODE (quadratic grid) and with the law-preserving SDE
(``sampler.steps``, and twice that), and reports per prompt the reward's mean, R-CVaR(0.1) and L-CVaR(0.1), the fraction of
recognisable samples (an object of the named colour: presence P > 1/2), in the tail (r > 4) and in the failure
region (r < -2), next to the same statistics of the data. Writes ``benchmarks/results/scenes_base.{md,json,png}``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf

from rewards.scenes import FAILURE_LEVEL, TAIL_LEVEL, SceneReward, sample_scenes, scene_parts
from rewards.scenes.plots import plot_scene_grid
from rewards.scenes.reward import channels_of
from tfft.conv_model import ConvVelocity
from tfft.model import flow_matching_loss
from tfft.sampling import sample_ode, sample_sde, time_grid
from tfft.tail import cvar

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SHAPE = (3, 16, 16)


def flat_velocity(net: ConvVelocity, cond: list[str]):
    """v(x (n, 768), t (n,)) of ``net`` for the fixed prompts ``cond`` (n,)."""
    return lambda x, t: net(x.reshape(x.shape[0], *SHAPE), t, cond).reshape(x.shape[0], -1)


def pretrain(net: ConvVelocity, data: torch.Tensor, cond: list[str], *, steps: int, batch_size: int, lr: float,
             seed: int, log=print) -> list[float]:
    """Conditional flow matching (Adam, cosine decay) on data (N, 768) with prompts cond (N,); loss per 10%."""
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
    gen = torch.Generator().manual_seed(seed)
    every, running, history = max(steps // 10, 1), 0.0, []
    start = time.time()
    for step in range(1, steps + 1):
        idx = torch.randint(0, data.shape[0], (batch_size,), generator=gen)
        loss = flow_matching_loss(flat_velocity(net, [cond[i] for i in idx.tolist()]), data[idx], generator=gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        running += float(loss.detach())
        if step % every == 0:
            history.append(running / every)
            log(f"[pretrain] step {step}/{steps} loss {history[-1]:.4f} ({time.time() - start:.0f}s)")
            running = 0.0
    return history


def statistics(reward: SceneReward, x: torch.Tensor, prompt: str) -> dict[str, float]:
    """Reward statistics of images x (n, 768) of one prompt."""
    batch = reward.evaluate(x.double(), [prompt] * x.shape[0])
    r = batch.rewards[batch.valid].numpy()
    with torch.no_grad():
        parts = scene_parts(x.double(), channels_of([prompt] * x.shape[0], x.shape[0], reward.prompts))
    return {
        "mean": float(r.mean()),
        "r_cvar_0.1": cvar(r, side="right", alpha=0.1),
        "l_cvar_0.1": cvar(r, side="left", alpha=0.1),
        "recognisable": float((parts.presence > 0.5).double().mean()),
        "tail": float((batch.rewards > TAIL_LEVEL).double().mean()),
        "failure": float((batch.rewards < FAILURE_LEVEL).double().mean()),
        "valid": float(batch.valid.double().mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "tune_configs" / "scenes_right.yaml"))
    parser.add_argument("--steps", type=int, default=0, help="pretraining steps (0: the config's)")
    parser.add_argument("--n", type=int, default=500, help="samples per prompt and sampler")
    parser.add_argument("--out", default=str(RESULTS / "scenes_base"))
    parser.add_argument("--save", default="", help="also save the pretrained network's state dict here")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on shared cores two threads were 10x slower than one)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = OmegaConf.to_container(OmegaConf.load(args.config), resolve=True)
    prompts: list[str] = list(cfg["data"]["conditions"])
    pre = {"n_samples": 50_000, "steps": 3000, "batch_size": 512, "lr": 2e-3, **cfg.get("pretrain", {})}
    steps = args.steps or int(pre["steps"])
    sde_steps = int(cfg.get("sampler", {}).get("steps", 40))
    seed = int(cfg.get("seed", 0))
    reward = SceneReward(**cfg["reward"].get("kwargs", {}))

    started = time.time()
    data = torch.from_numpy(np.concatenate([sample_scenes(int(pre["n_samples"]), seed, cond=p) for p in prompts]))
    cond = [p for p in prompts for _ in range(int(pre["n_samples"]))]
    torch.manual_seed(seed)
    net = ConvVelocity(**cfg["model"].get("kwargs", {}), conditions=prompts)
    history = pretrain(net, data, cond, steps=steps, batch_size=int(pre["batch_size"]), lr=float(pre["lr"]), seed=seed)
    pretrain_s = time.time() - started
    if args.save:
        Path(args.save).parent.mkdir(parents=True, exist_ok=True)
        torch.save(net.state_dict(), args.save)

    net.eval()
    gen = torch.Generator().manual_seed(seed + 1)
    rows: dict[str, dict[str, Any]] = {}
    kinds = ("ode", "sde", f"sde {2 * sde_steps} steps")
    samples: dict[str, dict[str, torch.Tensor]] = {kind: {} for kind in kinds}
    timings = {}
    for kind in kinds:
        t0 = time.time()
        for p in prompts:
            v = flat_velocity(net, [p] * args.n)
            x0 = torch.randn(args.n, 768, generator=gen)
            with torch.no_grad():
                x = (sample_ode(v, x0, time_grid(sde_steps, kind="quadratic")) if kind == "ode"
                     else sample_sde(v, x0, sde_steps * (2 if kind != "sde" else 1), generator=gen))
            samples[kind][p] = x
        timings[kind] = time.time() - t0
    for p in prompts:
        data_p = data[[i for i, c in enumerate(cond) if c == p][: max(args.n, 2000)]]
        rows[p] = {"data": statistics(reward, data_p, p),
                   **{kind: statistics(reward, samples[kind][p], p) for kind in kinds}}

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    data_rows = {p: data[[i for i, c in enumerate(cond) if c == p][:8]] for p in prompts}
    plot_scene_grid(out.with_suffix(".png"),
                    torch.cat(list(data_rows.values())).numpy(), np.ones(8 * len(prompts), bool),
                    [p for p in prompts for _ in range(8)],
                    torch.cat([samples["sde"][p][:8] for p in prompts]).numpy(), np.ones(8 * len(prompts), bool),
                    [p for p in prompts for _ in range(8)], labels=("data", f"base model, SDE {sde_steps} steps"))
    lines = [
        "# Scenes task: the pretrained base model per prompt",
        "",
        f"`python -m benchmarks.scenes_base{f' --steps {steps}' if args.steps else ''}`: ConvVelocity "
        f"{cfg['model'].get('kwargs', {})} ({sum(p.numel() for p in net.parameters())} parameters), "
        f"{steps} flow-matching steps of batch {pre['batch_size']} on {pre['n_samples']} images per prompt "
        f"(lr {pre['lr']}, cosine), seed {seed}; {args.n} samples per prompt and sampler: the Euler ODE on a "
        f"quadratic grid and the law-preserving SDE, {sde_steps} steps each (the config's sampler), and the SDE "
        f"with twice the steps. Wall time on this machine "
        f"(2 shared CPU cores, torch threads {torch.get_num_threads()}): data and pretraining "
        f"{pretrain_s:.0f} s; sampling {len(prompts) * args.n} images: "
        + ", ".join(f"{kind} {sec:.0f} s" for kind, sec in timings.items()) + ".",
        "",
        f"Flow-matching loss per tenth of pretraining: {', '.join(f'{h:.3f}' for h in history)}.",
        "",
        "Recognisable: an object of the named colour (presence P > 1/2). Tail: r > 4; failure region: r < -2.",
        "",
        "| prompt | sampler | mean | R-CVaR(0.1) | L-CVaR(0.1) | recognisable | tail | failure |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p, by in rows.items():
        for kind, st in by.items():
            lines.append(f"| {p} | {kind} | {st['mean']:.2f} | {st['r_cvar_0.1']:.2f} | {st['l_cvar_0.1']:.2f} | "
                         f"{100 * st['recognisable']:.1f}% | {100 * st['tail']:.1f}% | {100 * st['failure']:.1f}% |")
    lines += ["", f"Samples (first 8 per prompt, data | SDE): `{out.with_suffix('.png').name}`."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(
        {"steps": steps, "n": args.n, "pretrain_seconds": pretrain_s, "sampling_seconds": timings,
         "loss": history, "prompts": rows}, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
