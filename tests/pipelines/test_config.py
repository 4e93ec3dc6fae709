"""Config: merge order, validation messages naming the key, exit code 2 before Ray starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.cli import main
from pipelines.config import ConfigError, from_dict, load_config, to_flat_dict, to_yaml

CONFIGS = sorted((Path(__file__).parents[2] / "tune_configs").glob("*.yaml"))


def test_defaults_file_and_overrides_merge_in_order(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("objective:\n  alpha: 0.2\n  side: left\nbank:\n  size: 100\n")
    cfg = load_config(path, ["objective.alpha=0.05", "reward.kwargs.peak_height=3"])
    assert cfg.objective.alpha == 0.05 and cfg.objective.side == "left"
    assert cfg.bank.size == 100 and cfg.eval.size == 20_000
    assert cfg.reward.kwargs == {"peak_height": 3}
    assert from_dict(__import__("yaml").safe_load(to_yaml(cfg))) == cfg
    assert to_flat_dict(cfg)["objective.alpha"] == 0.05


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_validate(path, tmp_path):
    if path.name.startswith("sweep_"):  # a run config plus a `sweep:` section
        from pipelines.sweep.spec import load_sweep

        sweep = load_sweep(path)
        assert len(sweep.trials) >= 2 and len({t.name for t in sweep.trials}) == len(sweep.trials)
        return
    if path.name == "sd_tiny_clip.yaml":  # its pipeline directories are written first, as its header says
        from pipelines.adapters.tiny import write_tiny_clip, write_tiny_sd

        write_tiny_sd(tmp_path / "sd")
        write_tiny_clip(tmp_path / "clip")
        cfg = load_config(path, [f"task.dir={tmp_path}"])
        assert cfg.data.conditions == ["a photo of a cat", "a photo of a dog"]
    else:
        cfg = load_config(path)
    from pipelines.stages.preflight import sampler_warnings

    # no shipped config sets what its solver ignores (an explicit solver, or adjoint for auto)
    solver = cfg.finetune.solver if cfg.finetune.solver != "auto" else "adjoint"
    assert "ignored_by_solver" not in {w.kind for w in sampler_warnings(cfg, solver)}


@pytest.mark.parametrize(
    "override, key",
    [
        ("objective.alhpa=0.1", "objective.alhpa"),
        ("objective.alpha=0", "objective.alpha"),
        ("objective.alpha=1.5", "objective.alpha"),
        ("objective.kl_weight=0", "objective.kl_weight"),
        ("objective.kl_weight=-2", "objective.kl_weight"),
        ("objective.side=up", "objective.side"),
        ("objective.kind=median", "objective.kind"),
        ("reward.target=nonexistent_mod:R", "reward.target"),
        ("data.source=rewards.toy2d:nothing", "data.source"),
        ("bank.size=abc", "bank.size"),
        ("bank.reward.num_cpus=-1", "bank.reward.num_cpus"),
        ("finetune.solver=magic", "finetune.solver"),
        ("finetune.sde_steps=1", "finetune.sde_steps"),
        ("finetune.holdout_fraction=0.7", "finetune.holdout_fraction"),
        ("finetune.clip_quantile=1.5", "finetune.clip_quantile"),
        ("finetune.oversample=0", "finetune.oversample"),
        ("finetune.poll_interval_s=0", "finetune.poll_interval_s"),
        ("finetune.clip_factor=0.5", "finetune.clip_factor"),
        ("finetune.guard_validity_drop=2", "finetune.guard_validity_drop"),
        ("finetune.guard_eval_margin=-1", "finetune.guard_eval_margin"),
        ("finetune.guard_patience=-1", "finetune.guard_patience"),
        ("finetune.warmup_steps=-1", "finetune.warmup_steps"),
        ("sampler.steps=1", "sampler.steps"),
        ("objective.invalid_reward=nan", "objective.invalid_reward"),
        ("objective.invalid_reward=low", "objective.invalid_reward"),
    ],
)
def test_bad_settings_name_the_key(override, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config(None, [override])


def _choice_fields():
    """(dotted key, allowed values) of every Literal-typed field of the run config's schema."""
    import dataclasses
    import typing

    from pipelines.schema import Config

    def walk(cls, prefix):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            hint = hints[f.name]
            if typing.get_origin(hint) is typing.Literal:
                yield f"{prefix}{f.name}", typing.get_args(hint)
            elif dataclasses.is_dataclass(hint):
                yield from walk(hint, f"{prefix}{f.name}.")

    return list(walk(Config, ""))


def test_every_choice_is_a_literal_that_the_merge_enforces():
    """Each choice of the schema accepts its listed values and rejects another, in one line naming the key and the
    values allowed; its default is one of them."""
    fields = _choice_fields()
    assert {"finetune.solver", "objective.side", "objective.kind", "sampler.kind", "finetune.backend"} <= dict(fields).keys()
    for key, allowed in fields:
        for value in allowed:
            cfg = load_config(None, [f"{key}={value}", "finetune.num_workers=1"])
            section, _, name = key.rpartition(".")
            node = cfg
            for part in section.split("."):
                node = getattr(node, part)
            assert getattr(node, name) == value
        with pytest.raises(ConfigError) as info:
            load_config(None, [f"{key}=not_a_choice"])
        assert f"'{key}'" in str(info.value) and all(repr(v) in str(info.value) for v in allowed), str(info.value)


def test_cli_config_error_is_one_line_and_exit_code_2(capsys, tmp_path):
    import ray

    code = main(["run", str(CONFIGS[0]), "objective.alpha=2", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "objective.alpha" in err
    assert not ray.is_initialized()
    assert not (tmp_path / "o").exists()


def test_cli_config_prints_resolved_yaml(capsys):
    assert main(["config", str(CONFIGS[0]), "seed=7"]) == 0
    assert "seed: 7" in capsys.readouterr().out


def test_cli_rejects_stray_arguments():
    with pytest.raises(SystemExit) as exc:
        main(["config", str(CONFIGS[0]), "--bogus"])
    assert exc.value.code == 2


def test_one_sampler_by_default_and_warnings_for_weak_settings():
    from pipelines.stages.preflight import sampler_record, sampler_warnings, training_steps

    cfg = load_config(None, [])
    assert training_steps(cfg) == cfg.sampler.steps and sampler_record(cfg)["same_as_finetune"]
    assert sampler_warnings(cfg, "adjoint") == []  # 512 x 0.1 trajectories per update carry gradient
    two = load_config(None, ["finetune.sde_steps=20", "finetune.batch_size=64"])
    warnings = sampler_warnings(two, "adjoint")
    assert not sampler_record(two)["same_as_finetune"]
    assert [w.kind for w in warnings] == ["two_samplers", "thin_tail_signal"]
    assert warnings[0].numbers == {"sampler_kind": "sde", "sampler_steps": cfg.sampler.steps, "finetune_sde_steps": 20}
    thin = warnings[1].numbers
    assert (thin["batch_size"], thin["oversample"], thin["alpha"]) == (64, 1, 0.1)
    assert thin["expected"] == pytest.approx(64 * 1 * 0.1)
    assert warnings[1].to_dict()["kind"] == "thin_tail_signal" and warnings[1].to_dict()["expected"] == thin["expected"]
    # the weighted solver reads neither sampler of training trajectories: sde_steps is named as ignored
    (ignored,) = sampler_warnings(two, "weighted")
    assert ignored.kind == "ignored_by_solver" and ignored.numbers == {"solver": "weighted", "keys": ["sde_steps"]}
    assert "finetune.sde_steps" in str(ignored)
    assert sampler_warnings(load_config(None, ["finetune.batch_size=64"]), "weighted") == []
    several = load_config(None, ["finetune.oversample=4", "finetune.normalize=true", "finetune.lr=1e-3"])
    assert sampler_warnings(several, "weighted")[0].numbers["keys"] == ["normalize", "oversample"]
    # an ODE bank sampler is a second sampler even at the training step count; mean objectives have no thin tail
    ode = sampler_warnings(load_config(None, ["sampler.kind=ode", "objective.kind=mean"]), "adjoint")
    assert [(w.kind, w.numbers["sampler_kind"]) for w in ode] == [("two_samplers", "ode")]


def _one_line_error(capsys, args: list[str], *keys: str) -> None:
    from pipelines.cli import main

    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tfft: config error:") and all(k in err[0] for k in keys), err


def test_an_override_into_a_list_item_is_a_config_error():
    with pytest.raises(ConfigError, match="replace the whole list"):
        load_config(Path(__file__).parents[2] / "tune_configs/toy2d_composite.yaml", ["reward.kwargs.terms.1.weight=0.5"])


@pytest.mark.parametrize("command", ["run", "bank", "sweep"])
def test_an_unreachable_cluster_is_a_one_line_error_naming_the_address(capsys, tmp_path, command):
    import socket

    import ray

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = CONFIGS[0] if command != "sweep" else Path(__file__).parents[2] / "tune_configs/sweep_toy2d_smoke.yaml"
    _one_line_error(capsys, [command, str(config), "--out", str(tmp_path / "o"), "--address", f"127.0.0.1:{port}"],
                    f"127.0.0.1:{port}", "cannot reach a Ray cluster")
    assert not ray.is_initialized() and not (tmp_path / "o").exists()


def test_out_naming_a_file_is_a_one_line_error(capsys, tmp_path):
    target = tmp_path / "results.txt"
    target.write_text("not a directory")
    _one_line_error(capsys, ["run", str(CONFIGS[0]), "--out", str(target)], "is a file")
    assert target.read_text() == "not a directory"


@pytest.mark.parametrize(
    "source, why",
    [("os:system", "calling it failed"), ("numpy:arange", "must return an array of shape (n, d)")],
)
def test_a_bad_data_source_is_a_one_line_error_before_ray(capsys, tmp_path, source, why):
    # os.system(n, seed) has the wrong signature; numpy.arange(n, seed) returns a 1-D (empty) array.
    # Both fail in pretraining, before any MLflow or Ray work (a fresh MLflow store logs its creation).
    store = tmp_path / "mlflow.db"
    args = ["run", str(CONFIGS[0]), f"data.source={source}", "seed=0", f"pretrain.cache_dir={tmp_path / 'c'}",
            f"tracking.uri=sqlite:///{store}", "--out", str(tmp_path / "o")]
    _one_line_error(capsys, args, "data.source", why)
    import ray

    assert not ray.is_initialized() and not store.exists()


def test_reward_hooks_are_declared_on_the_base_class():
    from rewards.base import Reward, load_reward

    class Plain(Reward):
        def evaluate(self, x):  # pragma: no cover - not called
            raise AssertionError

    plain = Plain()
    assert plain.value_kwargs() is None and plain.evaluate_detailed(None) is None and plain.version == "1"
    argv = ["cp", "{input}", "{output}"]
    command = load_reward("rewards.simulator:Command", {"argv": argv, "timeout_s": 5})
    assert command.value_kwargs() == {"argv": argv, "env": command.env, "name": command.name}


@pytest.mark.parametrize("overrides, keys", [
    (["ray.num_cpus=1", "finetune.num_workers=2"], ("'finetune.num_workers' (2)", "ray.num_cpus", "needs 2 CPUs")),
    (["ray.num_cpus=2", "finetune.cpus_per_worker=1.5"], ("'finetune.cpus_per_worker' (1.5)", "needs 3 CPUs")),
])
def test_a_worker_group_larger_than_the_local_ray_is_a_one_line_error(capsys, tmp_path, overrides, keys):
    """Ray Train would wait for workers that cannot start, time out and retry forever."""
    import ray

    if ray.is_initialized():  # the check is for a Ray the run is about to start
        ray.shutdown()
    config = Path(__file__).parents[2] / "tune_configs/toy2d_right.yaml"
    _one_line_error(capsys, ["run", str(config), "--out", str(tmp_path / "o"), *overrides], *keys)
    assert not (tmp_path / "o").exists()  # nothing done


def test_finetune_defaults_are_the_solvers_own():
    """`pipelines.schema_finetune` stays free of torch, so it repeats `tfft.solvers.AdjointMatchingConfig`'s
    defaults: this holds the two copies together (config key -> solver field)."""
    import dataclasses

    from pipelines.schema_finetune import FinetuneConfig
    from tfft.solvers import AdjointMatchingConfig

    solver = {f.name: f.default for f in dataclasses.fields(AdjointMatchingConfig)}
    config = FinetuneConfig()
    renamed = {"fast_path": "fast"}
    shared = ("late_fraction", "n_early", "normalize", "clip_quantile", "clip_factor", "oversample", "fast_path",
              "loss_chunk", "adjoint_chunk", "reweight")
    assert {k: getattr(config, k) for k in shared} == {k: solver[renamed.get(k, k)] for k in shared}
    assert config.autocast == "none" and solver["autocast"] is None


def _readers(section: str, name: str) -> set[str]:
    """Modules of `pipelines/` whose code reads ``<something>.<section>.<name>`` (attribute access, not text)."""
    import ast

    def is_section(node: ast.AST, aliases: set[str]) -> bool:
        return (isinstance(node, ast.Attribute) and node.attr == section) or (
            isinstance(node, ast.Name) and node.id in aliases)

    root = Path(__file__).parents[2] / "pipelines"
    found = set()
    for path in root.rglob("*.py"):
        tree = ast.parse(path.read_text())
        pairs = [(target, node.value) for node in ast.walk(tree) if isinstance(node, ast.Assign)
                 for target in node.targets]
        pairs += [pair for target, value in pairs if isinstance(target, ast.Tuple) and isinstance(value, ast.Tuple)
                  for pair in zip(target.elts, value.elts)]  # sc, obj = cfg.reward.screen, cfg.objective
        aliases = {target.id for target, value in pairs if isinstance(target, ast.Name) and is_section(value, set())}
        if any(isinstance(node, ast.Attribute) and node.attr == name and is_section(node.value, aliases)
               for node in ast.walk(tree)):
            found.add(str(path.relative_to(root)))
    return found


def test_solver_and_alpha_are_read_where_the_readme_says():
    """README "How a setting reaches the code": ``finetune.solver`` is read by preflight alone (its resolution);
    ``objective.alpha`` where the Tilt is built and by the three uses before a threshold exists. A new reader is a
    second path for the setting: route it through `RunPlan` or the `Tilt` instead."""
    assert _readers("finetune", "solver") == {"stages/preflight.py"}
    assert _readers("objective", "alpha") == {"stages/threshold.py", "stages/preflight.py", "screening.py",
                                              "validation.py"}
