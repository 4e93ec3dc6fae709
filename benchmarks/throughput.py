"""Reward-pool throughput on this machine; results to ``benchmarks/results/throughput.{json,md}``.

    python -m benchmarks.throughput            # all three parts, about 3 minutes on 2 cores
    python -m benchmarks.throughput --quick    # fewer samples

1. Latency-bound simulator (50 ms per call, almost no CPU): P reward actors x M calls in flight each,
   steady-state samples/s against the ideal P*M/0.05.
2. CPU-bound simulator (pure-Python work per sample): 2 actors against 1 actor.
3. Cheap reward: the whole Ray Data bank (sampler pool -> reward pool -> shards) over 100k samples against
   an in-process loop doing the same sampling and scoring; the ratio of wall times.

Every figure is a ratio measured in one run on one machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).parent / "results"


def _pool_rate(target: str, kwargs: dict, *, actors: int, in_flight: int, n: int, batch: int, num_cpus: float) -> float:
    """Steady-state samples/s of a reward pool: (2n - n) / (T(2n) - T(n)).

    The difference of two runs cancels the fixed costs (actor start-up, filling and draining the
    pipeline), which would otherwise be charged to the throughput.
    """
    t1 = _pool_seconds(target, kwargs, actors=actors, in_flight=in_flight, n=n, batch=batch, num_cpus=num_cpus)
    t2 = _pool_seconds(target, kwargs, actors=actors, in_flight=in_flight, n=2 * n, batch=batch, num_cpus=num_cpus)
    return n / (t2 - t1)


def _pool_seconds(target: str, kwargs: dict, *, actors: int, in_flight: int, n: int, batch: int, num_cpus: float) -> float:
    """Wall time of scoring n samples through a fresh reward pool."""
    import ray.data

    from pipelines.reward_actor import RewardActor

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    x = np.random.default_rng(0).normal(size=(n, 2))
    blocks = [x[i : i + batch] for i in range(0, n, batch)]
    ids = [np.arange(i, i + len(b)) for i, b in zip(range(0, n, batch), blocks)]
    ds = ray.data.from_items([{"id": i, "x": row} for i, row in zip(np.concatenate(ids), x)], override_num_blocks=len(blocks))
    ds = ds.map_batches(
        RewardActor,
        fn_constructor_kwargs={
            "target": target,
            "kwargs": kwargs,
            "pool": {"call_size": 1, "max_in_flight": in_flight, "retries": 0, "backoff_s": 0.0},
            "cache_dir": None,
        },
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=num_cpus,
        batch_size=batch,
    )
    start, rows = time.perf_counter(), 0
    for out in ds.iter_batches(batch_size=None, batch_format="numpy"):
        rows += len(out["id"])
    assert rows == n, (rows, n)
    return time.perf_counter() - start


def latency_bound(quick: bool) -> list[dict]:
    rows = []
    for actors, in_flight in [(1, 1), (1, 4), (2, 4), (1, 16), (2, 8), (4, 4)]:
        ideal = actors * in_flight / 0.05
        seconds = 3 if quick else 6
        batch = in_flight * 8
        n = max(int(ideal * seconds), 4 * batch * actors)
        rate = _pool_rate(
            "benchmarks.bench_rewards:SleepReward", {"latency_s": 0.05},
            actors=actors, in_flight=in_flight, n=n, batch=batch, num_cpus=min(1.0, 2.0 / actors),
        )
        rows.append({"actors": actors, "in_flight": in_flight, "ideal": ideal, "samples_per_s": rate,
                     "fraction_of_ideal": rate / ideal})
        print(f"latency-bound P={actors} M={in_flight}: {rate:.0f}/s of ideal {ideal:.0f}/s ({rate / ideal:.0%})")
    return rows


def cpu_bound(quick: bool) -> dict:
    n = 120 if quick else 300
    rates = {}
    for actors in (1, 2):
        rates[actors] = _pool_rate(
            "benchmarks.bench_rewards:BusyReward", {"cpu_s": 0.02},
            actors=actors, in_flight=1, n=n, batch=10, num_cpus=1.0,
        )
    print(f"cpu-bound: 1 actor {rates[1]:.1f}/s, 2 actors {rates[2]:.1f}/s, ratio {rates[2] / rates[1]:.2f}")
    return {"one_actor": rates[1], "two_actors": rates[2], "ratio": rates[2] / rates[1]}


def cheap_bank(quick: bool) -> dict:
    from pipelines.bank import generate_bank
    from pipelines.config import load_config
    from pipelines.models import build_model
    from pipelines.pretrain import load_or_pretrain
    from rewards.toy2d import TailReward2D
    from tfft.sampling import sample_sde

    size = 20_000 if quick else 100_000
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(None, [
            f"bank.size={size}", "bank.shard_size=20000", "bank.cache=false", f"pretrain.cache_dir={tmp}/cache",
            "pretrain.steps=300", "bank.sampler.size=2", "bank.sampler.num_cpus=0.75", "bank.reward.num_cpus=0.5",
        ])
        base = load_or_pretrain(cfg, log=lambda _: None)
        start = time.perf_counter()
        generate_bank(cfg, (base.config, base.state_dict), size=size, label="bench", out_path=Path(tmp) / "b.parquet",
                      log=lambda _: None)
        ray_seconds = time.perf_counter() - start

        model = build_model(base.config, base.state_dict).eval()
        reward = TailReward2D()
        torch.set_num_threads(2)
        gen = torch.Generator().manual_seed(0)
        start = time.perf_counter()
        for i in range(0, size, 1024):
            with torch.no_grad():
                x = sample_sde(model, torch.randn(min(1024, size - i), 2, generator=gen), cfg.sampler.steps, generator=gen)
                reward.evaluate(x.double())
        loop_seconds = time.perf_counter() - start
    print(f"cheap reward, {size} samples: Ray Data bank {ray_seconds:.1f}s, in-process loop {loop_seconds:.1f}s, "
          f"ratio {ray_seconds / loop_seconds:.2f}")
    return {"samples": size, "ray_bank_seconds": ray_seconds, "in_process_seconds": loop_seconds,
            "ratio": ray_seconds / loop_seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    import ray

    ray.init(address="local", include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).parents[1])}})
    result = {
        "machine": {"cpus": int(ray.cluster_resources().get("CPU", 0)), "platform": platform.platform()},
        "latency_bound": latency_bound(args.quick),
        "cpu_bound": cpu_bound(args.quick),
        "cheap_reward": cheap_bank(args.quick),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "throughput.json").write_text(json.dumps(result, indent=2))
    lines = ["| actors P | in flight M | ideal P·M/0.05 (samples/s) | measured (samples/s) | fraction |", "|---|---|---|---|---|"]
    for r in result["latency_bound"]:
        lines.append(f"| {r['actors']} | {r['in_flight']} | {r['ideal']:.0f} | {r['samples_per_s']:.0f} | {r['fraction_of_ideal']:.0%} |")
    c, b = result["cpu_bound"], result["cheap_reward"]
    lines += ["", f"CPU-bound (20 ms of CPU per sample): 1 actor {c['one_actor']:.1f}/s, 2 actors {c['two_actors']:.1f}/s, "
              f"ratio {c['ratio']:.2f}.", "",
              f"Cheap reward, {b['samples']} samples: Ray Data bank {b['ray_bank_seconds']:.1f} s, in-process loop "
              f"{b['in_process_seconds']:.1f} s, ratio {b['ratio']:.2f}."]
    (RESULTS / "throughput.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
