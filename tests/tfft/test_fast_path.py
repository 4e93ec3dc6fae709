"""The adjoint-matching fast path gives the reference's loss, gradients and metrics on the same inputs.

The fast path (`AdjointMatchingConfig.fast`) runs the adjoint only on trajectories with a non-zero terminal
adjoint, reuses the sampler's own network evaluations at the loss's time steps, and on CUDA replays the sampler
and adjoint loops as CUDA graphs; the reference does none of that. Same generator state, same numbers. The chunked loss (`AdjointMatchingConfig.loss_chunk`: the loss evaluated and
backpropagated a few time steps at a time) gives the same gradient too, also under DDP (one all-reduce).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor

from tfft.graphs import GraphedAdjoint, GraphedSampler, bucket_rows
from tfft.adjoint import lean_adjoint
from tfft.model import VelocityMLP
from tfft.pseudo import PseudoReward, pseudo_reward_signal
from tfft.sampling import sample_sde
from tfft.solvers import AdjointMatchingConfig, AdjointMatchingSolver

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _models(dim: int, device: str, dtype: torch.dtype) -> tuple[VelocityMLP, VelocityMLP]:
    torch.manual_seed(0)
    base = VelocityMLP(dim, hidden=32, depth=2).to(device=device, dtype=dtype).requires_grad_(False)
    model = copy.deepcopy(base).requires_grad_(True)
    with torch.no_grad():  # a fine-tuned model that already differs from the base
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model, base


def _tail_reward(eta: float, invalid_every: int = 7):
    """Right tail of r = x_0 + x_1 beyond eta; every `invalid_every`-th sample fails (NaN)."""

    def fn(x1: Tensor) -> PseudoReward:
        r = x1.sum(dim=1)
        valid = torch.arange(len(x1), device=x1.device) % invalid_every != 0
        r = torch.where(valid, r, torch.full_like(r, float("nan")))
        return pseudo_reward_signal(r, torch.ones_like(x1), valid, eta=eta, side="right", alpha=0.3)

    return fn


def _run(
    fast: bool, device: str, dtype: torch.dtype, oversample: int, eta: float, loss_chunk: int = 0,
    autocast: torch.dtype | None = None, adjoint_chunk: int = 0,
) -> tuple[Tensor, list[Tensor], dict]:
    model, base = _models(2, device, dtype)
    config = AdjointMatchingConfig(kl_weight=0.5, steps=12, n_early=3, oversample=oversample, fast=fast,
                                   loss_chunk=loss_chunk, autocast=autocast, adjoint_chunk=adjoint_chunk)
    solver = AdjointMatchingSolver(model, base, _tail_reward(eta), config)
    generator = torch.Generator(device=device).manual_seed(5)
    x0 = torch.randn(48 * oversample, 2, generator=generator, device=device, dtype=dtype)
    results = []
    moves = torch.Generator().manual_seed(9)
    for _ in range(2):  # a second step: the graphs' replay and the conditioning's running statistics
        model.zero_grad()
        result = solver.step(x0, generator)
        assert result.backpropagated == (loss_chunk > 0)
        result.backward()
        results.append(result)
        with torch.no_grad():  # an optimiser's in-place update: the second step (a replay) must see it
            for p in model.parameters():
                p.add_(0.2 * torch.randn(p.shape, generator=moves).to(p))
    grads = [p.grad.detach().clone() for p in model.parameters()]
    return results[-1].loss.detach(), grads, {k: float(v) for k, v in results[-1].metrics.items()}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("oversample, eta", [(1, 1.0), (1, -50.0), (3, 1.0)])
def test_fast_path_matches_the_reference(device: str, oversample: int, eta: float) -> None:
    # eta 1.0: a tail (some trajectories inactive); eta -50: every valid trajectory active (mean-like objective).
    dtype = torch.float64 if device == "cpu" else torch.float32
    tol = {"rtol": 1e-9, "atol": 1e-11} if dtype == torch.float64 else {"rtol": 2e-4, "atol": 1e-6}
    loss_ref, grads_ref, metrics_ref = _run(False, device, dtype, oversample, eta)
    assert 0.0 < metrics_ref["active_fraction"] <= 1.0 and metrics_ref["valid_fraction"] < 1.0
    # the fast path; the loss in chunks of 2 and of 5 of the 6 chosen steps (fast), and of 4 (reference path); the
    # adjoint's vector-Jacobian products 5 rows at a time (fast) and 7 (reference)
    for fast, chunk, rows in ((True, 0, 0), (True, 2, 0), (True, 5, 0), (False, 4, 0), (True, 0, 5), (False, 0, 7)):
        loss, grads, metrics = _run(fast, device, dtype, oversample, eta, loss_chunk=chunk, adjoint_chunk=rows)
        torch.testing.assert_close(loss, loss_ref, **tol)
        for got, want in zip(grads, grads_ref, strict=True):
            torch.testing.assert_close(got, want, **tol)
        assert metrics.keys() == metrics_ref.keys()
        for name, want in metrics_ref.items():
            assert metrics[name] == pytest.approx(want, rel=1e-6 if dtype == torch.float64 else 1e-3, abs=1e-9), name


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_autocast_on_a_tail_is_float32_within_bf16_rounding(device: str) -> None:
    # A tail objective: the inactive trajectories' base velocities come from one batched call under autocast (in
    # bf16) into the float32 buffer. Both paths under autocast land within bf16's rounding of the float32 step.
    loss32, grads32, metrics32 = _run(True, device, torch.float32, 1, 1.0)
    assert 0.0 < metrics32["active_fraction"] < 1.0
    flat32 = torch.cat([g.flatten() for g in grads32])
    for fast in (True, False):
        loss, grads, metrics = _run(fast, device, torch.float32, 1, 1.0, autocast=torch.bfloat16)
        assert loss.dtype == torch.float32 and float(loss) == pytest.approx(float(loss32), rel=0.02)  # measured 0.4%
        flat = torch.cat([g.flatten() for g in grads])
        cosine = float(torch.nn.functional.cosine_similarity(flat, flat32, dim=0))
        print(f"\nbf16 {'fast' if fast else 'reference'}: loss {float(loss) / float(loss32) - 1:+.2%}, gradient "
              f"{float((flat - flat32).norm() / flat32.norm()):.2%} off, cosine {cosine:.5f}")
        assert cosine > 0.999
        assert float((flat - flat32).norm() / flat32.norm()) < 0.03  # measured 1%
        assert metrics["active_fraction"] == metrics32["active_fraction"]


def test_bucket_rows() -> None:
    assert [bucket_rows(r, 512) for r in (1, 64, 65, 500, 512)] == [64, 64, 128, 512, 512]
    assert bucket_rows(3, 5) == 3  # quantum 1
    with pytest.raises(ValueError):
        bucket_rows(0, 8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_graphed_sampler_and_adjoint_equal_the_eager_loops() -> None:
    model, base = _models(3, "cuda", torch.float32)
    x0 = torch.randn(40, 3, device="cuda")
    noise = torch.randn(10, 40, 3, device="cuda")
    graphed = GraphedSampler(model, 40, 3, 10, device="cuda")
    for _ in range(2):
        eager = sample_sde(model, x0, 10, noise=noise, return_trajectory=True)
        replay = graphed(x0, noise)
        torch.testing.assert_close(replay.xs, eager.xs)
        torch.testing.assert_close(replay.velocities, eager.velocities)
        with torch.no_grad():  # an optimiser step in place: the next replay must see it
            for p in model.parameters():
                p.mul_(0.9)
    graphed_adjoint = GraphedAdjoint(base, bucket_rows(25, 40), 3, 10, offset=eager.offset, device="cuda")
    for rows in (25, 21, 25):  # replays with padding, after other allocations have reused freed memory
        scratch = [torch.randn(1000, device="cuda") for _ in range(20)]
        terminal = torch.randn(rows, 3, device="cuda")
        sub = eager.subset(torch.arange(rows, device="cuda"))
        adjoint = graphed_adjoint(sub.xs, terminal)
        reference = lean_adjoint(base, sub, terminal)
        torch.testing.assert_close(adjoint.states, reference.states)
        torch.testing.assert_close(adjoint.base_velocities, reference.base_velocities)
        del scratch


def _ddp_worker(rank: int, port: int, out: dict) -> None:
    """Rank `rank` of 2: the fast path through DDP (several attached forwards, one backward) vs the reference."""
    import os

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        grads = {}
        for fast, chunk in ((True, 0), (True, 2), (False, 0)):  # chunked: backward per 2 steps under no_sync
            model, base = _models(2, "cpu", torch.float64)
            net = DistributedDataParallel(model) if fast else model
            config = AdjointMatchingConfig(kl_weight=0.5, steps=10, fast=fast, loss_chunk=chunk)
            solver = AdjointMatchingSolver(net, base, _tail_reward(1.0), config)
            generator = torch.Generator().manual_seed(rank)
            for _ in range(2):
                model.zero_grad()
                solver.step(torch.randn(32, 2, generator=generator, dtype=torch.float64), generator).backward()
            grads[fast, chunk] = [p.grad.clone() for p in model.parameters()]
        for g in grads[False, 0]:  # what DDP should produce: the mean of the ranks' reference gradients
            dist.all_reduce(g)
            g /= 2
        out[rank] = all(torch.allclose(a, b, rtol=1e-9, atol=1e-12)
                        for key in ((True, 0), (True, 2)) for a, b in zip(grads[key], grads[False, 0], strict=True))
    finally:
        dist.destroy_process_group()


def test_fast_path_under_ddp_gives_the_mean_of_the_ranks_gradients() -> None:
    # The fast path calls the DDP-wrapped model at each chosen step (several forwards before one backward).
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.spawn(_ddp_worker, args=(port, out), nprocs=2)
    assert dict(out) == {0: True, 1: True}
