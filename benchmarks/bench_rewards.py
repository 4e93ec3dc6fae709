"""Synthetic rewards for the throughput benchmark: a latency-bound and a CPU-bound 'simulator'."""

from __future__ import annotations

import time

import numpy as np
import torch

from rewards.base import Reward, RewardBatch

__all__ = ["SleepReward", "BusyReward"]


class SleepReward(Reward):
    """``latency_s`` of waiting per call and almost no CPU (a remote service, a queue, a licence server)."""

    name = "sleep"

    def __init__(self, latency_s: float = 0.05):
        self.latency_s = float(latency_s)

    def evaluate(self, x: torch.Tensor) -> RewardBatch:
        time.sleep(self.latency_s)
        r = x.sum(-1).to(torch.float64)
        return RewardBatch(r, torch.ones(len(r), dtype=torch.bool))


class BusyReward(Reward):
    """About ``cpu_s`` of pure-Python CPU work per sample (holds the GIL: only processes scale)."""

    name = "busy"

    def __init__(self, cpu_s: float = 0.01):
        self.cpu_s = float(cpu_s)

    def evaluate(self, x: torch.Tensor) -> RewardBatch:
        out = np.empty(len(x))
        for i, row in enumerate(x.tolist()):
            deadline = time.thread_time() + self.cpu_s
            acc = 0.0
            while time.thread_time() < deadline:
                for v in row:
                    acc += v * 1e-9
            out[i] = sum(row) + acc * 0.0
        r = torch.as_tensor(out)
        return RewardBatch(r, torch.ones(len(r), dtype=torch.bool))
