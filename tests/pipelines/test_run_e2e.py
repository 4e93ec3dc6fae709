"""End to end on the 2-D task: mean, right-CVaR and left-CVaR fine-tuning through the whole pipeline.

The session's shared local Ray (``local_ray``, conftest.py). The shipped configs run at smoke size (10k banks,
300 fine-tuning steps, 20 SDE steps: ``SMOKE``); the full-size runs are the benchmark's
(``benchmarks/toy2d_figure.py``).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipelines.bankio import read_bank
from pipelines.cli import main
from tfft.objective import Tilt
from tfft.tail import cvar

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).parents[2]
STAT_KEYS = {"n", "n_valid", "mean", "cvar_right", "cvar_left"}
LEVELS = {"0.05", "0.1", "0.2"}
N = 10_000
SMOKE = [f"bank.size={N}", f"eval.size={N}", "finetune.steps=300", "sampler.steps=20"]
# In-process fine-tuning (no worker-group start-up): Ray Train's DDP worker group on the local Ray is the one-trial
# sweep's in test_sweep.py (two workers), on a cluster test_cluster.py's.
LOCAL = ["finetune.backend=local", "finetune.num_workers=1"]

USER_MODULE = '''
import numpy as np
import torch

def source(n, seed):
    return np.random.default_rng(seed).normal(size=(n, 3))

def reward(x):
    r = -((x - 1.0) ** 2).sum(-1)
    return torch.where(x[:, 0] < -1.5, torch.full_like(r, float("nan")), r)  # fails for x0 < -1.5 (about 7%)
'''


@pytest.fixture(scope="module")
def env(tmp_path_factory, pretrain_cache, local_ray):
    """The shared Ray session, whose workers see the user modules on PYTHONPATH, plus shared stores."""
    root = tmp_path_factory.mktemp("e2e")
    (local_ray / "my_task.py").write_text(USER_MODULE)
    shutil.copy(Path(__file__).with_name("user_flow_model.py"), local_ray)  # a user's own flow model
    common = [f"pretrain.cache_dir={pretrain_cache}", f"tracking.uri=sqlite:///{root / 'mlflow.db'}",
              f"bank.cache_dir={root / 'rewards'}"]
    return {"root": root, "common": common, "uri": f"sqlite:///{root / 'mlflow.db'}"}


@pytest.fixture(scope="module")
def runs(env):
    """Run the three shipped 2-D configs; returns {name: (out_dir, summary)}."""
    out = {}
    for name in ("mean", "right", "left"):
        out_dir = env["root"] / name
        code = main(["run", str(ROOT / f"tune_configs/toy2d_{name}.yaml"), "--out", str(out_dir), *SMOKE, *LOCAL,
                     *env["common"]])
        assert code == 0
        out[name] = (out_dir, json.loads((out_dir / "summary.json").read_text()))
    return out


@pytest.fixture(scope="module")
def weighted_run(env, runs):
    """Right-CVaR with the reward as a black box: weighted flow matching on the bank (DESIGN §7)."""
    out_dir = env["root"] / "right_weighted"
    args = ["run", str(ROOT / "tune_configs/toy2d_right.yaml"), "--out", str(out_dir), "finetune.solver=weighted", *SMOKE,
            *LOCAL, "finetune.holdout_fraction=0.1"]
    assert main([*args, *env["common"]]) == 0
    return out_dir, json.loads((out_dir / "summary.json").read_text())


def test_outputs_follow_the_contract(runs):
    for name, (out_dir, summary) in runs.items():
        for f in ("config.yaml", "bank_base.parquet", "bank_final.parquet", "summary.json", "rewards.png", "samples.png"):
            assert (out_dir / f).is_file(), f"{name}: {f} missing"
        assert (out_dir / "checkpoint" / "model.pt").is_file()
        for block in ("base", "finetuned", "target"):
            stats = summary[block]
            assert STAT_KEYS <= set(stats)
            assert set(stats["cvar_right"]) == LEVELS and set(stats["cvar_left"]) == LEVELS
            assert stats["n"] == stats["n_valid"] == N
        if name == "mean":
            assert summary["threshold"] is None
        else:
            assert set(summary["threshold"]) == {"eta", "value", "tail_mass", "ess", "active_fraction"}
            assert summary["threshold"]["tail_mass"] == pytest.approx(0.1, abs=0.01)
        bank = read_bank(out_dir / "bank_final.parquet")
        assert len(bank) == N and sorted(bank.ids.tolist()) == list(range(N))
        assert summary["invalid"] == {"rule": "exclude", "value": None, "left_tail_both_ways": {},
                                      "invalid_fraction": {"base": 0.0, "finetuned": 0.0}}
        assert summary["sampler"]["same_as_finetune"] and summary["sampler"]["steps"] == 20
        _assert_built_from_scratch(summary["stages"], N)
        assert summary["warnings"] == []  # 512 x 0.1 trajectories per update carry gradient, one sampler
        assert summary["guard"]["kept"] in ("last", "best") and summary["guard"]["reason"]
        interval = summary["target_interval"]
        for key in ("mean",):
            assert interval["lo"][key] <= summary["target"][key] <= interval["hi"][key]


def _assert_built_from_scratch(stages: dict, n: int, shards: int = 2) -> None:
    """A first run into a new directory: every stage built in this call (the base model may come from the shared
    pretraining cache, and rewards from the shared reward cache)."""
    assert list(stages) == ["pretrain", "bank_base", "threshold", "finetune", "bank_final"]
    assert stages["pretrain"]["status"] in ("built", "reused")
    for name in ("bank_base", "threshold", "finetune", "bank_final"):
        assert stages[name]["status"] == "built" and stages[name]["seconds"] >= 0, name
    for name in ("bank_base", "bank_final"):
        bank = stages[name]
        assert (bank["samples"], bank["sampled"], bank["from_shards"], bank["from_file"]) == (n, n, 0, 0), name
        assert (bank["shards"], bank["shards_resumed"]) == (shards, 0) and 0 <= bank["from_cache"] <= n, name
    assert stages["threshold"]["samples"] == n
    finetune = stages["finetune"]
    assert finetune["runs"] == 1 and finetune["steps_reused"] == 0 and finetune["steps_run"] > 0


def test_each_tail_objective_beats_the_expected_reward_model_on_its_side(runs):
    mean, right, left = runs["mean"][1], runs["right"][1], runs["left"][1]
    assert right["finetuned"]["cvar_right"]["0.1"] > mean["finetuned"]["cvar_right"]["0.1"]
    assert left["finetuned"]["cvar_left"]["0.1"] > mean["finetuned"]["cvar_left"]["0.1"]
    # and every fine-tuned model improved its own objective over the base model
    assert right["finetuned"]["cvar_right"]["0.1"] > right["base"]["cvar_right"]["0.1"]
    assert left["finetuned"]["cvar_left"]["0.1"] > left["base"]["cvar_left"]["0.1"]
    assert mean["finetuned"]["mean"] > mean["base"]["mean"]


def test_fine_tuned_statistics_match_the_exact_target(runs):
    for name, side in (("right", "right"), ("left", "left")):
        out_dir, summary = runs[name]
        base = read_bank(out_dir / "bank_base.parquet")
        reward_range = float(np.ptp(base.reward[base.valid]))
        assert summary["threshold"]["ess"] > 1000
        got = summary["finetuned"][f"cvar_{side}"]["0.1"]
        want = summary["target"][f"cvar_{side}"]["0.1"]
        assert abs(got - want) <= 0.1 * reward_range, (name, got, want, reward_range)
    mean = runs["mean"][1]
    assert abs(mean["finetuned"]["mean"] - mean["target"]["mean"]) <= 0.1 * reward_range


def test_weighted_solver_reaches_the_target_without_reward_gradients(weighted_run, runs):
    out_dir, summary = weighted_run
    assert summary["solver"] == "weighted"
    # with rows held out, the guard followed their gain and kept a fine-tuned state
    assert summary["guard"]["kept"] in ("last", "best") and "holdout_gain" in summary["guard"]["reason"]
    base = read_bank(out_dir / "bank_base.parquet")
    reward_range = float(np.ptp(base.reward[base.valid]))
    got, want = summary["finetuned"]["cvar_right"]["0.1"], summary["target"]["cvar_right"]["0.1"]
    assert abs(got - want) <= 0.1 * reward_range, (got, want)
    assert got > runs["mean"][1]["finetuned"]["cvar_right"]["0.1"]
    adjoint_seconds = runs["right"][1]["finetune_seconds"]
    print(f"fine-tuning wall time: weighted {summary['finetune_seconds']:.1f}s, adjoint {adjoint_seconds:.1f}s")
    assert summary["finetune_seconds"] > 0 and adjoint_seconds > 0


def test_mlflow_holds_params_step_metrics_and_artifacts(runs, env):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=env["uri"])
    exp = client.get_experiment_by_name("tfft")
    found = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    for name in ("mean", "right", "left"):
        run = found[name]
        assert run.info.status == "FINISHED"
        assert run.data.params["objective.kind"] == ("mean" if name == "mean" else "cvar")
        history = client.get_metric_history(run.info.run_id, "loss")
        assert len({m.step for m in history}) >= 5
        for key in ("mean_reward", "active_fraction", "objective", "kl", "loss_ratio", "grad_clipped",
                    "finetuned.cvar_right_0.1", "target.cvar_left_0.1", "target_lo.cvar_left_0.1"):
            assert key in run.data.metrics, (name, key)
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"summary.json", "rewards.png", "samples.png"} <= artifacts


def test_rerun_with_same_out_reuses_every_stage(runs, env):
    out_dir, before = runs["right"]
    mtime = (out_dir / "bank_final.parquet").stat().st_mtime
    args = ["run", str(ROOT / "tune_configs/toy2d_right.yaml"), "--out", str(out_dir), *SMOKE, *LOCAL, *env["common"]]
    assert main(args) == 0
    after = json.loads((out_dir / "summary.json").read_text())
    stages = after["stages"]
    assert {name: stage["status"] for name, stage in stages.items()} == {
        "pretrain": "reused", "bank_base": "reused", "threshold": "built", "finetune": "reused", "bank_final": "reused"}
    for name in ("bank_base", "bank_final"):
        assert (stages[name]["from_file"], stages[name]["sampled"]) == (N, 0), name
    finetune, trained = stages["finetune"], before["stages"]["finetune"]
    assert (finetune["steps_run"], finetune["steps_reused"]) == (0, trained["steps_run"])
    assert after["finetuned"] == before["finetuned"] and after["threshold"] == before["threshold"]
    assert (out_dir / "bank_final.parquet").stat().st_mtime == mtime


def test_a_model_the_evaluation_check_rejects_is_replaced_by_the_base_also_on_a_rerun(env):
    """A fine-tuning wrecked by a step size 1,000 times the default (weighted solver: no running metric for the
    in-training guard) ends below its base on the right tail: the base model is returned, the final bank is the
    base bank, and a rerun reuses that decision and that bank instead of sampling the base model again."""
    out_dir = env["root"] / "rejected"
    args = ["run", str(ROOT / "tune_configs/toy2d_right.yaml"), "--out", str(out_dir), "finetune.solver=weighted",
            "finetune.lr=3", "finetune.steps=60", "bank.size=2000", "eval.size=1000", "sampler.steps=20", *LOCAL,
            *env["common"]]
    assert main(args) == 0
    before = json.loads((out_dir / "summary.json").read_text())
    check = before["guard"]["evaluation"]
    assert before["guard"]["kept"] == "base" and check["worse"] and check["finetuned"] < check["base"]
    assert before["finetuned"] == before["base"] and before["finetuned"]["n"] == 2000
    assert len(read_bank(out_dir / "bank_rejected.parquet")) == 1000
    assert (out_dir / "checkpoint" / "model_rejected.pt").is_file()
    assert main(args) == 0
    after = json.loads((out_dir / "summary.json").read_text())
    final = after["stages"]["bank_final"]
    assert (final["status"], final["sampled"], final["from_file"]) == ("reused", 0, 2000)
    assert after["finetuned"] == before["finetuned"] and after["guard"] == before["guard"]


def test_the_paired_check_reads_two_banks_of_common_noise(env):
    """finetune.guard_paired_size: the check draws its own base and fine-tuned samples, row by row with one noise
    (so each fine-tuned sample sits near its base sample), and compares them pairwise: the difference is the
    mean paired difference of the influence functions, its error far below the unpaired one."""
    out_dir = env["root"] / "paired"
    args = ["run", str(ROOT / "tune_configs/toy2d_right.yaml"), "--out", str(out_dir), "finetune.solver=weighted",
            "finetune.steps=100", "bank.size=2000", "eval.size=1000", "sampler.steps=20",
            "finetune.guard_paired_size=500", *LOCAL, *env["common"]]
    assert main(args) == 0
    summary = json.loads((out_dir / "summary.json").read_text())
    check = summary["guard"]["evaluation"]
    base, tuned = (read_bank(out_dir / "guard" / f"check_{name}.parquet") for name in ("base", "finetuned"))
    assert len(base) == len(tuned) == 500 and check["rows"] == "paired" and check["paired_n"] == 500
    tilt = Tilt.from_dict({k: v for k, v in summary["objective"].items() if k != "kind"})
    ob, of = np.argsort(base.ids), np.argsort(tuned.ids)
    phi_b, phi_f = tilt.influence(base.reward[ob]), tilt.influence(tuned.reward[of])
    assert check["finetuned"] - check["base"] == pytest.approx(float((phi_f - phi_b).mean()), abs=1e-9)
    assert check["difference_se"] < 0.5 * math.hypot(check["base_se"], check["finetuned_se"])
    paired_gap = np.linalg.norm(tuned.x[of] - base.x[ob], axis=1).mean()
    independent = np.linalg.norm(tuned.x[of] - base.x[ob][::-1], axis=1).mean()
    assert paired_gap < 0.3 * independent
    assert summary["finetuned"]["n"] == (2000 if check["worse"] else 1000)  # the final bank only reports


def test_changed_config_in_same_out_is_refused(runs, env, capsys):
    out_dir, _ = runs["left"]
    args = ["run", str(ROOT / "tune_configs/toy2d_left.yaml"), "--out", str(out_dir), "objective.alpha=0.2", *SMOKE,
            *LOCAL]
    assert main([*args, *env["common"]]) == 2
    assert "different config" in capsys.readouterr().err


def test_plain_function_reward_and_data_source_from_pythonpath(env):
    """A user module on PYTHONPATH: 3-D data source and a plain torch function as the reward, which fails (NaN)
    for x0 < -1.5; the run counts the failures at objective.invalid_reward = -30 (in the left tail)."""
    out_dir = env["root"] / "user"
    args = [
        "run", str(ROOT / "tune_configs/toy2d_left.yaml"), "--out", str(out_dir),
        "data.source=my_task:source", "reward.target=my_task:reward", "objective.invalid_reward=-30",
        "bank.size=1000", "eval.size=1000", "pretrain.steps=200", "finetune.steps=20", "finetune.log_every=5",
        *LOCAL, *env["common"],
    ]
    assert main(args) == 0
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["solver"] == "adjoint" and summary["finetuned"]["n"] == 1000
    final = read_bank(out_dir / "bank_final.parquet")
    assert final.x.shape == (1000, 3)
    assert not (out_dir / "samples.png").exists()  # only 2-D tasks get the scatter
    # failures: counted at -30 in the statistics, reported both ways, the mask kept in n_valid
    base = read_bank(out_dir / "bank_base.parquet")
    assert set(base.error[~base.valid]) == {"nan"} and 0.02 < (~base.valid).mean() < 0.15
    invalid = summary["invalid"]
    assert invalid["rule"] == "assign" and invalid["value"] == -30.0
    assert invalid["invalid_fraction"]["base"] == pytest.approx((~base.valid).mean())
    assert summary["base"]["n_valid"] == base.n_valid and summary["base"]["n"] == 1000
    want = cvar(np.where(base.valid, base.reward, -30.0), side="left", alpha=0.1)
    assert summary["base"]["cvar_left"]["0.1"] == pytest.approx(want)
    ways = invalid["left_tail_both_ways"]["base"]
    assert ways["assigned"]["0.1"] == pytest.approx(want)
    assert ways["excluded"]["0.1"] == pytest.approx(cvar(base.reward[base.valid], side="left", alpha=0.1))


def test_molecule_config_runs_for_another_molecule_by_override(env):
    """tune_configs/molecule_left.yaml with task.smiles=CCO (ethanol, 9 atoms): the data source and the
    GFN1-xTB reward follow the override; the reward's own statistics reach summary.json and MLflow."""
    out_dir = env["root"] / "ethanol"
    args = [
        "run", str(ROOT / "tune_configs/molecule_left.yaml"), "--out", str(out_dir), "task.smiles=CCO",
        "pretrain.n_samples=1000", "pretrain.steps=1500", "bank.size=200", "bank.shard_size=100", "eval.size=100",
        "bank.reward.size=1", "finetune.steps=4", "finetune.log_every=2", "finetune.batch_size=8",
        "reward.kwargs.reference_samples=5", f"reward.kwargs.cache_dir={env['root'] / 'molecule'}",
        "finetune.guard_paired_size=50", *LOCAL, *env["common"],
    ]
    assert main(args) == 0
    summary = json.loads((out_dir / "summary.json").read_text())
    assert read_bank(out_dir / "bank_base.parquet").x.shape == (200, 27)
    # as the config ships: the weighted solver, and the paired evaluation check (smoke size here); a model that
    # 4 steps left near its base may fall on either side of it, and then the base bank is the final bank
    check = summary["guard"]["evaluation"]
    assert summary["solver"] == "weighted" and check["rows"] == "paired" and 40 <= check["paired_n"] <= 50
    assert summary["finetuned"]["n"] == (200 if summary["guard"].get("kept") == "base" else 100)
    assert summary["failures"]["base"]["valid"] >= 100  # most generated ethanols keep their bonds
    for label in ("base", "finetuned"):
        stats = summary["samples"][label]
        assert 0.0 < stats["diversity_rmsd"] < 3.0 and 0.5 <= stats["topology_valid"] <= 1.0
    assert summary["base"]["cvar_right"]["0.1"] <= 0.5  # rewards are minus energies above the best ETKDG one
    assert not (out_dir / "ramachandran.png").exists()  # ethanol has no peptide backbone
    import mlflow

    runs = mlflow.MlflowClient(tracking_uri=env["uri"]).search_runs(
        [e.experiment_id for e in mlflow.MlflowClient(tracking_uri=env["uri"]).search_experiments()],
        "attributes.run_name = 'ethanol'",
    )
    assert runs and "finetuned.diversity_rmsd" in runs[0].data.metrics


USER_MODEL_CONFIG = """
data: {source: user_flow_model:source, kwargs: {mean: [1.5, -0.5]}}
model: {target: user_flow_model:gaussian_flow, kwargs: {mean: [1.5, -0.5]}, sample_shape: [2, 1]}
pretrain: {steps: 0}
reward: {target: user_flow_model:first_coordinate}
objective: {kind: cvar, side: right, alpha: 0.1, kl_weight: 1.0}
sampler: {steps: 10}
bank: {size: 4000, shard_size: 2000}
eval: {size: 1000}
finetune: {steps: 10, batch_size: 64, num_workers: 1, log_every: 5, checkpoint_every: 5, backend: local}
"""


@pytest.fixture(scope="module")
def user_model_run(env):
    """The run of ``USER_MODEL_CONFIG``: (config path, out_dir, summary)."""
    config = env["root"] / "user_model.yaml"
    config.write_text(USER_MODEL_CONFIG)
    out_dir = env["root"] / "user_model"
    assert main(["run", str(config), "--out", str(out_dir), *env["common"]]) == 0
    return config, out_dir, json.loads((out_dir / "summary.json").read_text())


def test_user_flow_model_without_pretraining(user_model_run):
    """A user's module (samples shaped (2, 1); exact velocity of N(mean, I) plus a zero-initialised correction),
    no pretraining: the base bank is N(mean, I) (the SDE's Euler steps keep the mean exactly), summary.json
    records the shape, and checkpoint/model.pt loads into the user's module."""
    import torch

    from pipelines.models import build_model
    from user_flow_model import gaussian_flow

    _, out_dir, summary = user_model_run
    assert summary["model"] == {"target": "user_flow_model:gaussian_flow", "kwargs": {"mean": [1.5, -0.5]},
                                "sample_shape": [2, 1], "dim": 2, "checkpoint": ""}
    assert summary["solver"] == "adjoint"
    base = read_bank(out_dir / "bank_base.parquet")
    assert base.x.shape == (4000, 2)
    assert base.x.mean(0) == pytest.approx([1.5, -0.5], abs=4 / np.sqrt(4000))  # 4 standard errors
    assert base.x.std(0) == pytest.approx([1.0, 1.0], abs=0.1)
    blob = torch.load(out_dir / "checkpoint" / "model.pt", map_location="cpu", weights_only=True)
    network = gaussian_flow([1.5, -0.5])
    network.load_state_dict(blob["state_dict"])  # strict: the user's own keys
    x, t = torch.randn(8, 2), torch.rand(8)
    want = network(x.reshape(8, 2, 1), t, None).reshape(8, 2)
    assert torch.allclose(build_model(blob["config"], blob["state_dict"])(x, t), want)
    # nothing pretrained: no pretrain stage; 64 x 0.1 trajectories per update carry gradient, and the run says so
    assert list(summary["stages"]) == ["bank_base", "threshold", "finetune", "bank_final"]
    (warning,) = summary["warnings"]
    assert warning["kind"] == "thin_tail_signal" and (warning["batch_size"], warning["alpha"]) == (64, 0.1)
    assert warning["expected"] == pytest.approx(6.4)


def test_a_rerun_resumes_a_lost_shard_and_a_lost_training_checkpoint(user_model_run, env):
    """As if the first run had been killed twice: the base bank's file and its second shard gone (the first
    shard stays), and the fine-tuned model gone with the training checkpoint of its last step (the one of step 5
    stays). The rerun samples only the lost shard, keeps the stored one, and trains only steps 6-10."""
    import shutil

    import torch

    from pipelines.train_session import local_checkpoints

    config, out_dir, _ = user_model_run
    base = read_bank(out_dir / "bank_base.parquet")
    (out_dir / "bank_base.parquet").unlink()
    (out_dir / "bank_base.parquet.shards" / "shard-00001.parquet").unlink()
    (out_dir / "checkpoint" / "model.pt").unlink()
    kept = local_checkpoints(out_dir / "train" / "finetune")
    assert [torch.load(k / "state.pt", weights_only=True)["step"] for k in kept] == [5, 10]
    shutil.rmtree(kept[-1])
    assert main(["run", str(config), "--out", str(out_dir), *env["common"]]) == 0
    after = json.loads((out_dir / "summary.json").read_text())
    stages = after["stages"]
    bank = stages["bank_base"]
    assert bank["status"] == "resumed" and (bank["shards"], bank["shards_resumed"]) == (2, 1)
    assert (bank["samples"], bank["sampled"], bank["from_shards"], bank["from_file"]) == (4000, 2000, 2000, 0)
    rebuilt = read_bank(out_dir / "bank_base.parquet")
    assert rebuilt.ids.tolist() == list(range(4000))
    np.testing.assert_array_equal(rebuilt.x[:2000], base.x[:2000])  # the stored shard, as it was
    finetune = stages["finetune"]
    assert finetune["status"] == "resumed" and (finetune["steps_run"], finetune["steps_reused"]) == (5, 5)
    final = stages["bank_final"]
    assert final["status"] == "reused" and (final["sampled"], final["from_file"]) == (0, 1000)
