"""A stochastic epidemic with a lockdown, run as an external simulator (issue 3, item 8).

Run: ``python -m rewards.examples.epidemic IN.npy OUT.npy``: reads samples x (B, 2) float64, writes
rewards (B,) float64. Used through :class:`rewards.simulator:Command` (``tune_configs/epidemic_left.yaml``).

Model: a metapopulation SEIR over K = 16 towns of Zipf-distributed sizes (1.35 M people), towns coupled
by a gravity kernel (10% of contacts outside one's town), simulated by tau-leaping (dt = 1 day,
240 days): per town k and step,

    new exposures   ~ Binomial(S_k, 1 - exp(-beta(t) * dt * sum_j C_kj I_j / N_j))
    new infectious  ~ Binomial(E_k, 1 - exp(-sigma * dt)),  new removed ~ Binomial(I_k, 1 - exp(-gamma * dt))

with a latent period 1/sigma = 3 days and an infectious period 1/gamma = 5 days. Each run starts with
Poisson(100 per million) imported cases in every town. R0 = beta0 / gamma is not known in advance: a
sample's reward averages the cost over an ensemble of runs, one per R0 in (1.4, 1.8, 2.2, 2.6)
(about 7 ms per run, 30 ms per sample on one core).

A sample x = (x0, x1) is a lockdown policy: strength s = 0.9 sigmoid(x0) (contact reduction) from day
t0 = 60 sigmoid(x1) for 90 days. The reward (higher is better, about -15 to -5) is minus the cost

    cost = 10 * attack rate  +  2 * overload  +  8 * s^2

where the attack rate is the fraction ever infected and overload the person-days spent above hospital
capacity (prevalence 1.5% in a town) per person. Strong early lockdowns can stamp the epidemic out but
cost the most; weak ones let the epidemic run and fill the lower tail, which left-CVaR fine-tuning
removes. The randomness of the runs (imported cases, binomial draws) comes from a seed derived from the
bytes of x and ``--seed``: the same sample always gets the same reward. The noise is small (a std of
about 0.1 for weak lockdowns) except where a strong lockdown may or may not stamp the epidemic out.

``--dt`` sets the time step (default 1 day). The same model with a coarse step is its own cheap screen
(``tune_configs/epidemic_left_screened.yaml``, `pipelines.screening`): on 400 samples of the base model,
``--dt 2`` costs half as much and ranks like the fine model (Spearman 0.91; it puts 37 of the fine model's
worst 40 among its own worst 120), ``--dt 4`` a quarter (Spearman 0.69, 21 of 40).

For fault-injection demos only, ``TFFT_EPIDEMIC_FAULT`` = nan | crash | hang makes samples with
||x|| > ``TFFT_EPIDEMIC_FAULT_RADIUS`` (default 3.5) give NaN, crash the call (exit 3) or hang it. Unset
(the default) nothing fails on purpose.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from dataclasses import dataclass

import numpy as np

__all__ = ["Outcome", "policy", "simulate", "cost", "epidemic_reward", "rewards_of", "main"]

N_TOWNS = 16
POPULATION = np.floor(400_000 / np.arange(1, N_TOWNS + 1)).astype(np.int64)
OUTSIDE_CONTACTS = 0.10
LATENT_DAYS, INFECTIOUS_DAYS = 3.0, 5.0
R0_GRID = np.linspace(1.4, 2.6, 4)
HORIZON_DAYS, DT = 240.0, 1.0
LOCKDOWN_DAYS = 90.0
CAPACITY = 0.015  # prevalence a town's hospitals can take
SEED_CASES_PER_MILLION = 100.0


def _coupling() -> np.ndarray:
    """(K, K) row-stochastic contact matrix: own town 1 - OUTSIDE_CONTACTS, rest by gravity N_j / dist^2."""
    position = np.arange(N_TOWNS, dtype=np.float64)
    dist = np.abs(position[:, None] - position[None, :])
    gravity = np.where(dist > 0, POPULATION[None, :] / np.maximum(dist, 1.0) ** 2, 0.0)
    gravity /= gravity.sum(1, keepdims=True)
    return (1 - OUTSIDE_CONTACTS) * np.eye(N_TOWNS) + OUTSIDE_CONTACTS * gravity


COUPLING = _coupling()


@dataclass(frozen=True)
class Outcome:
    """One simulated epidemic: ``attack_rate`` (fraction ever infected), ``overload`` (person-days above
    capacity per person), ``peak`` (largest town prevalence), ``r0`` (the drawn R0)."""

    attack_rate: float
    overload: float
    peak: float
    r0: float


def policy(x: np.ndarray) -> tuple[float, float]:
    """Sample x (2,) -> (lockdown strength s in (0, 0.9), start day t0 in (0, 60))."""
    sig = 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))
    return 0.9 * float(sig[0]), 60.0 * float(sig[1])


def simulate(strength: float, start_day: float, r0: float, rng: np.random.Generator, dt: float = DT) -> Outcome:
    """One tau-leaping SEIR run with basic reproduction number ``r0`` under a lockdown of ``strength``
    from ``start_day`` (module doc), in steps of ``dt`` days."""
    beta0, sigma, gamma = r0 / INFECTIOUS_DAYS, 1.0 / LATENT_DAYS, 1.0 / INFECTIOUS_DAYS
    p_onset, p_removal = 1 - np.exp(-sigma * dt), 1 - np.exp(-gamma * dt)
    n = POPULATION
    susceptible, exposed, infectious = n.copy(), np.zeros_like(n), np.zeros_like(n)
    seeded = rng.poisson(SEED_CASES_PER_MILLION * 1e-6 * n)
    infectious += seeded
    susceptible -= seeded
    above, peak = 0.0, 0.0
    for step in range(int(round(HORIZON_DAYS / dt))):
        t = step * dt
        beta = beta0 * (1 - strength) if start_day <= t < start_day + LOCKDOWN_DAYS else beta0
        pressure = COUPLING @ (infectious / n)
        new_exposed = rng.binomial(susceptible, -np.expm1(-beta * dt * pressure))
        new_infectious = rng.binomial(exposed, p_onset)
        new_removed = rng.binomial(infectious, p_removal)
        susceptible -= new_exposed
        exposed += new_exposed - new_infectious
        infectious += new_infectious - new_removed
        prevalence = infectious / n
        peak = max(peak, float(prevalence.max()))
        above += float(np.maximum(infectious - CAPACITY * n, 0).sum()) * dt
    attack_rate = 1.0 - float(susceptible.sum()) / float(n.sum())
    return Outcome(attack_rate, above / float(n.sum()), peak, float(r0))


def _seed_of(x: np.ndarray, seed: int) -> int:
    payload = np.ascontiguousarray(x, dtype="<f8").tobytes() + seed.to_bytes(8, "little", signed=True)
    digest = hashlib.sha256(payload).digest()
    return int.from_bytes(digest[:8], "little")


def cost(outcome: Outcome, strength: float) -> float:
    """10 * attack rate + 2 * overload + 8 * strength^2 (module doc)."""
    return 10.0 * outcome.attack_rate + 2.0 * outcome.overload + 8.0 * strength**2


def epidemic_reward(x: np.ndarray, seed: int = 0, dt: float = DT) -> float:
    """Reward of one sample x (2,): minus the ensemble-mean cost, deterministic in (x, seed, dt)."""
    strength, start_day = policy(x)
    rng = np.random.default_rng(_seed_of(x, seed))
    return -float(np.mean([cost(simulate(strength, start_day, r0, rng, dt), strength) for r0 in R0_GRID]))


def rewards_of(x: np.ndarray, seed: int = 0, dt: float = DT) -> np.ndarray:
    """Rewards of samples x (B, 2) -> (B,) float64, one ensemble of runs each, in steps of ``dt`` days."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != 2:
        raise ValueError(f"the epidemic simulator takes samples of shape (B, 2), got {x.shape}")
    if not 0 < dt <= LOCKDOWN_DAYS:
        raise ValueError(f"dt must be in (0, {LOCKDOWN_DAYS:g}] days, got {dt}")
    return np.array([epidemic_reward(row, seed, dt) for row in x], dtype=np.float64)


def _deliberate_faults(x: np.ndarray) -> np.ndarray:
    """Failures for demos, only when TFFT_EPIDEMIC_FAULT is set (module doc): crash or hang right away
    on a chunk with an odd sample; in 'nan' mode return the (B,) mask of samples to report as NaN."""
    mode = os.environ.get("TFFT_EPIDEMIC_FAULT", "")
    if mode not in ("", "nan", "crash", "hang"):
        raise SystemExit(f"TFFT_EPIDEMIC_FAULT must be nan, crash or hang, got {mode!r}")
    odd = np.linalg.norm(x, axis=1) > float(os.environ.get("TFFT_EPIDEMIC_FAULT_RADIUS", "3.5"))
    if not mode or not odd.any():
        return np.zeros(len(x), dtype=bool)
    if mode == "crash":
        print(f"epidemic: deliberate crash on {int(odd.sum())} odd sample(s)", file=sys.stderr)
        raise SystemExit(3)
    if mode == "hang":
        time.sleep(3600)
    return odd


def main(argv: list[str] | None = None) -> int:
    """Command line: ``INPUT.npy OUTPUT.npy [--seed S]``."""
    parser = argparse.ArgumentParser(
        prog="python -m rewards.examples.epidemic", description=__doc__.splitlines()[0]
    )
    parser.add_argument("input", help=".npy float64 samples, shape (B, 2)")
    parser.add_argument("output", help="where to write the .npy rewards, shape (B,)")
    parser.add_argument("--seed", type=int, default=0, help="seed mixed into every sample's own seed")
    parser.add_argument("--dt", type=float, default=DT,
                        help="time step in days (default 1); a coarse step (e.g. 2) is a cheap screen of the same model")
    args = parser.parse_args(argv)
    x = np.load(args.input, allow_pickle=False)
    nan = _deliberate_faults(x)
    rewards = np.where(nan, np.nan, rewards_of(x, args.seed, args.dt))
    tmp = args.output + ".part.npy"
    np.save(tmp, rewards)
    os.replace(tmp, args.output)  # the output appears complete or not at all
    return 0


if __name__ == "__main__":
    sys.exit(main())
