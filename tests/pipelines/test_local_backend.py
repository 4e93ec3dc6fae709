"""``finetune.backend: local``: the same loop as Ray Train's, in this process.

Small: a 2-D MLP, a few adjoint-matching steps. The Ray Train run (one worker) and the local run from the same
seeds and thread count must end in the same checkpoint; a local run stopped at a checkpoint and rerun with more
steps resumes from it and ends where an uninterrupted run ends.
"""

from __future__ import annotations

import pytest
import torch

from pipelines.config import ConfigError, load_config
from pipelines.finetune_job import FinetuneJob
from pipelines.trainer import run_finetune
from pipelines.models import build_model
from pipelines.schema import FinetuneConfig
from pipelines.train_session import LocalSession, forwarding_reports, local_checkpoints
from tfft.objective import Tilt

MODEL = {"dim": 2, "hidden": 16, "depth": 2}
TILT = Tilt(0.0, "right", 0.1, 10.0)


def _finetune(out, backend: str, steps: int, *, checkpoint_every: int = 5, callbacks=None, **kwargs):
    torch.manual_seed(0)
    base = build_model(MODEL).state_dict()
    ft = FinetuneConfig(steps=steps, batch_size=16, lr=3e-3, warmup_steps=2, num_workers=1, cpus_per_worker=1,
                        log_every=5, checkpoint_every=checkpoint_every, sde_steps=6, n_early=2, backend=backend,
                        guard=False)
    lines: list[str] = []
    job = FinetuneJob(ft, MODEL, base, TILT, "rewards.toy2d:TailReward2D", {}, seed=3, steps=steps, sde_steps=6,
                      **kwargs)
    result = run_finetune(job, name="finetune", storage_path=str(out), callbacks=callbacks, log=lines.append)
    return result, lines


def _assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], exact: bool = True) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if exact:
            assert torch.equal(a[key], b[key]), key
        else:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("local")
    return out, *_finetune(out, "local", 10)


@pytest.mark.ray
def test_local_ends_where_ray_train_with_one_worker_ends(tmp_path, local_run, local_ray):
    ray_result, _ = _finetune(tmp_path, "ray", 10)  # on the session's shared Ray (conftest.py)
    _, local_result, _ = local_run
    torch.manual_seed(0)
    base = build_model(MODEL).state_dict()
    assert any(not torch.equal(base[k], v) for k, v in ray_result.state_dict.items())  # it trained
    assert (ray_result.steps, ray_result.reused_steps) == (10, 0)
    # the same float32 ops on one thread each: bit-equal is expected; allow rounding if the kernels differ
    _assert_same_state(local_result.state_dict, ray_result.state_dict, exact=False)
    assert [h["step"] for h in local_result.history] == [h["step"] for h in ray_result.history] == [5, 10]
    for a, b in zip(local_result.history, ray_result.history):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


def test_local_run_checkpoints_like_ray_train(local_run):
    out, result, _ = local_run
    kept = local_checkpoints(out / "finetune")
    assert [p.name for p in kept] == ["checkpoint_000001", "checkpoint_000002"]  # steps 5 and 10: two kept
    assert result.checkpoint_path == str(kept[-1])
    blob = torch.load(kept[-1] / "state.pt", weights_only=True)
    assert blob["step"] == 10
    _assert_same_state(blob["model"], result.state_dict)
    assert (result.steps, result.reused_steps) == (10, 0)  # all trained in this call


def test_interrupted_local_run_resumes_from_its_latest_checkpoint(tmp_path, local_run):
    _, whole, _ = local_run
    first, _ = _finetune(tmp_path, "local", 5)  # as if killed right after step 5's checkpoint
    assert torch.load(first.checkpoint_path + "/state.pt", weights_only=True)["step"] == 5
    assert (first.steps, first.reused_steps) == (5, 0)
    resumed, _ = _finetune(tmp_path, "local", 10)
    blob = torch.load(resumed.checkpoint_path + "/state.pt", weights_only=True)
    assert blob["step"] == 10
    assert (resumed.steps, resumed.reused_steps) == (10, 5)  # steps 1-5 from the first call's checkpoint
    assert [h["step"] for h in resumed.history] == [5, 10]
    _assert_same_state(resumed.state_dict, whole.state_dict)
    # numbering continues after the existing checkpoints; only the newest two stay
    assert [p.name for p in local_checkpoints(tmp_path / "finetune")] == ["checkpoint_000001", "checkpoint_000002"]
    # a third call finds the last step stored: nothing left to train, every step reused
    again, _ = _finetune(tmp_path, "local", 10)
    assert (again.steps, again.reused_steps) == (10, 10)
    _assert_same_state(again.state_dict, whole.state_dict)


def test_a_restart_within_one_call_reuses_no_steps(tmp_path):
    """A worker group restarted by Ray Train resumes within the same driver call: its steps count as run."""
    _finetune(tmp_path, "local", 5, call="one call")  # the first worker group, stopped after step 5's checkpoint
    restarted, _ = _finetune(tmp_path, "local", 10, call="one call")
    assert (restarted.steps, restarted.reused_steps) == (10, 0)


def test_local_restores_the_callers_thread_count(tmp_path):
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _finetune(tmp_path, "local", 2, checkpoint_every=2)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_local_backend_config_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"'finetune.backend'.*'finetune.num_workers'"):
        load_config(None, ["finetune.backend=local", "finetune.num_workers=2"])
    with pytest.raises(ConfigError, match=r"'finetune.backend': Invalid value 'threads', expected one of \['ray', 'local'\]"):
        load_config(None, ["finetune.backend=threads"])
    assert load_config(None, ["finetune.backend=local", "finetune.num_workers=1"]).finetune.backend == "local"
    with pytest.raises(ConfigError, match="'finetune.backend' local cannot report to Tune callbacks"):
        _finetune(tmp_path, "local", 2, callbacks=[object()])
    assert not (tmp_path / "finetune").exists()  # refused before any work


def test_sweeps_accept_the_local_backend_on_cpu(tmp_path):
    from pipelines.sweep.spec import load_sweep

    config = tmp_path / "sweep.yaml"
    config.write_text("finetune: {num_workers: 1}\nsweep: {parameters: {finetune: {lr: {grid: [0.001, 0.01]}}}}\n")
    trials = load_sweep(config, ["finetune.backend=local"]).trials
    assert [t.config.finetune.backend for t in trials] == ["local", "local"]
    # a trial's Tune driver holds no GPU: local GPU fine-tuning is refused, naming the key
    with pytest.raises(ConfigError, match=r"^'finetune.backend' local trains in the trial's Tune driver"):
        load_sweep(config, ["finetune.backend=local", "finetune.use_gpu=true"])
    config.write_text("finetune: {num_workers: 1, use_gpu: true}\n"
                      "sweep: {parameters: {finetune: {backend: {grid: [ray, local]}}}}\n")
    with pytest.raises(ConfigError, match=r"^sweep trial '.*local.*': 'finetune.backend' local trains"):
        load_sweep(config)


def test_local_reports_reach_a_listener_after_their_checkpoint(tmp_path):
    """What a sweep trial forwards to Tune: every report, in order, each once its checkpoint is in place."""
    session = LocalSession(tmp_path / "run", torch.device("cpu"))
    source = tmp_path / "ckpt"
    source.mkdir()
    (source / "state.pt").write_text("x")
    seen: list[tuple[dict, list[str]]] = []

    def listener(metrics: dict) -> None:
        seen.append((metrics, [p.name for p in local_checkpoints(session.run_dir)]))

    session.report({"step": 1})  # no listener yet
    with forwarding_reports(listener):
        session.report({"step": 2, "loss": 0.5})
        session.report({"step": 3}, str(source))
    session.report({"step": 4})  # the listener is gone
    assert seen == [({"step": 2, "loss": 0.5}, []), ({"step": 3}, ["checkpoint_000001"])]
    assert [h["step"] for h in session.history] == [1, 2, 3, 4]


def test_a_job_names_its_solver_by_what_it_carries_and_refuses_bad_fields():
    """`FinetuneJob`: weighted when it carries bank rows, adjoint otherwise; K, steps and a LoRA warm start are
    checked when the job is built, before any worker starts; every job gets its own call token."""
    import dataclasses

    import numpy as np

    from pipelines.finetune_job import WeightedBank
    from pipelines.lora import LoraSettings

    base = build_model(MODEL).state_dict()
    job = FinetuneJob(FinetuneConfig(cpus_per_worker=0.5), MODEL, base, TILT, "rewards.toy2d:TailReward2D", {},
                      seed=0, steps=4, sde_steps=6)
    assert (job.solver, job.dim, job.threads) == ("adjoint", 2, 1)
    bank = WeightedBank(np.zeros((3, 2)), np.full(3, 1 / 3))
    assert dataclasses.replace(job, weighted=bank).solver == "weighted"
    # the guard follows the held-out gain of the anchored weighted solver, from 0 with no margin
    held = dataclasses.replace(job, weighted=bank, settings=dataclasses.replace(job.settings, holdout_fraction=0.1))
    held_guard, job_guard = held.guard(), job.guard()
    assert (held.holds_out, held_guard.metric, held_guard.baseline, held_guard.margin) == (True, "holdout_gain", 0.0, 0.0)
    assert (job.holds_out, job_guard.metric, job_guard.baseline, job_guard.margin) == (False, "objective", None, 2.0)
    assert job_guard.patience == job.settings.guard_patience and job_guard.enabled == job.settings.guard
    plain = dataclasses.replace(held, settings=dataclasses.replace(held.settings, anchor=False))
    off = dataclasses.replace(held, settings=job.settings)  # the default: no held-out rows
    assert not plain.holds_out and not off.holds_out and off.guard().metric == "objective"
    assert dataclasses.replace(job).call == job.call  # a copy is the same call: its checkpoints are its own
    assert FinetuneJob(job.settings, MODEL, base, TILT, "x:y", {}, seed=0, steps=1, sde_steps=1).call != job.call
    with pytest.raises(ValueError, match="sde_steps"):
        dataclasses.replace(job, sde_steps=0)
    with pytest.raises(ValueError, match="steps >= 1"):
        dataclasses.replace(job, steps=0)
    with pytest.raises(ValueError, match="init_adapter"):
        dataclasses.replace(job, lora=LoraSettings(4, 4.0), init_state=base)
