"""The model contract without Ray: building either kind from its config dict, checkpoints (.pt, .safetensors)
with strict loading, the pretrain cache key, and the config errors that name the key."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.config import ConfigError, load_config
from pipelines.models import build_model, load_checkpoint, model_config, model_record, read_checkpoint
from pipelines.pretrain import load_or_pretrain, pretrain_key
from tfft.model import VelocityMLP
from tfft.sampling import sample_ode, time_grid
from tfft.user_model import FlatVelocity
from user_flow_model import gaussian_flow

MEAN = [1.5, -0.5]
USER = ["model.target=user_flow_model:gaussian_flow", f"model.kwargs.mean={MEAN}", "model.sample_shape=[2,1]",
        "data.source=user_flow_model:source", f"data.kwargs.mean={MEAN}"]


def _cfg(tmp_path, *overrides):
    return load_config(None, [f"pretrain.cache_dir={tmp_path / 'cache'}", *overrides])


def test_builtin_model_config_and_cache_key_are_unchanged(tmp_path):
    cfg = _cfg(tmp_path)
    assert model_config(cfg.model, 2) == {"dim": 2, "hidden": 128, "depth": 3, "time_features": 16}
    assert isinstance(build_model(model_config(cfg.model, 2)), VelocityMLP)
    # the key of the default config: the payload as before user models existed, plus the data source's code
    import hashlib
    import json
    from dataclasses import asdict

    from pipelines.source_hash import source_hash

    root = Path(__file__).resolve().parents[2]
    payload = {"source": cfg.data.source, "model": {"hidden": 128, "depth": 3, "time_features": 16},
               "pretrain": {k: v for k, v in asdict(cfg.pretrain).items() if k != "cache_dir"}, "seed": 0,
               "torch": torch.__version__.split("+")[0],
               "data_code": source_hash(cfg.data.source.partition(":")[0], [root])}
    assert len(payload["data_code"]) == 16
    assert pretrain_key(cfg) == hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def test_user_model_is_the_base_without_pretraining(tmp_path):
    cfg = _cfg(tmp_path, *USER, "pretrain.steps=0")
    base = load_or_pretrain(cfg, log=lambda _: None)
    assert base.config == {"dim": 2, "target": "user_flow_model:gaussian_flow", "kwargs": {"mean": MEAN},
                           "sample_shape": [2, 1]}
    assert not base.cached and not (tmp_path / "cache").exists()  # nothing trained, nothing cached
    assert set(base.state_dict) == {"mean", "correction.weight", "correction.bias"}  # the user's keys
    model = build_model(base.config, base.state_dict)
    assert isinstance(model, FlatVelocity)
    # the ODE of the exact velocity keeps the mean exactly (Euler preserves x = t mean): closed form
    x1 = sample_ode(model, torch.randn(4000, 2, generator=torch.Generator().manual_seed(0)), time_grid(20))
    assert x1.mean(0).tolist() == pytest.approx(MEAN, abs=4 / math.sqrt(4000))
    assert model_record(base.config)["sample_shape"] == [2, 1]


def test_user_model_pretrains_and_keys_the_cache_by_target_and_kwargs(tmp_path):
    cfg = _cfg(tmp_path, *USER, "pretrain.steps=3", "pretrain.n_samples=64", "pretrain.batch_size=16")
    first = load_or_pretrain(cfg, log=lambda _: None)
    assert not first.cached and first.state_dict["correction.weight"].abs().sum() > 0  # trained
    assert load_or_pretrain(cfg, log=lambda _: None).cached
    other = _cfg(tmp_path, *USER, "pretrain.steps=3", "pretrain.n_samples=64", "pretrain.batch_size=16",
                 "model.kwargs.mean=[0.0,0.0]")
    assert pretrain_key(other) != pretrain_key(cfg)
    assert pretrain_key(_cfg(tmp_path, *USER, "model.sample_shape=[1,2]")) != pretrain_key(_cfg(tmp_path, *USER))


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_checkpoint_round_trip(tmp_path, suffix):
    trained = gaussian_flow(MEAN)
    with torch.no_grad():
        trained.correction.weight.normal_()
    path = tmp_path / f"flow{suffix}"
    if suffix == ".pt":
        torch.save(trained.state_dict(), path)
    else:
        from safetensors.torch import save_file

        save_file(trained.state_dict(), str(path))
    cfg = _cfg(tmp_path, *USER, f"model.checkpoint={path}", "pretrain.steps=50")
    base = load_or_pretrain(cfg, log=lambda _: None)  # a checkpoint is never pretrained
    for key, value in trained.state_dict().items():
        assert torch.equal(base.state_dict[key], value), key
    assert base.path == str(path) and not (tmp_path / "cache").exists()
    again = gaussian_flow(MEAN)
    again.load_state_dict(read_checkpoint(path))
    x, t = torch.randn(5, 2), torch.rand(5)
    assert torch.equal(build_model(base.config, base.state_dict)(x, t), again(x.reshape(5, 2, 1), t, None).reshape(5, 2))
    # replacing the file's content changes the cache key
    key = pretrain_key(cfg)
    torch.save({k: v + 1 for k, v in trained.state_dict().items()}, tmp_path / "other.pt")
    assert pretrain_key(_cfg(tmp_path, *USER, f"model.checkpoint={tmp_path / 'other.pt'}")) != key


def test_checkpoint_mismatch_is_one_line_naming_the_setting_and_keys(tmp_path):
    path = tmp_path / "wrong.pt"
    torch.save({"correction.weight": torch.zeros(2, 3), "extra.bias": torch.zeros(2)}, path)
    with pytest.raises(ConfigError) as err:
        load_checkpoint(gaussian_flow(), path)
    message = str(err.value)
    assert "\n" not in message and "'model.checkpoint'" in message
    assert "missing keys [mean, correction.bias]" in message and "unexpected keys [extra.bias]" in message
    torch.save({"mean": torch.zeros(2, 1), "correction.weight": torch.zeros(3, 3), "correction.bias": torch.zeros(2)},
               path)
    with pytest.raises(ConfigError, match="'model.checkpoint'.*size mismatch"):
        load_checkpoint(gaussian_flow(), path)
    # the built-in MLP loads checkpoints the same way
    with pytest.raises(ConfigError, match="missing keys \\[frequencies, net.0.weight"):
        load_or_pretrain(_cfg(tmp_path, f"model.checkpoint={path}"), log=lambda _: None)


@pytest.mark.parametrize(("overrides", "match"), [
    (["model.target=no_such_module:f"], "'model.target': cannot import module 'no_such_module'"),
    (["model.target=user_flow_model:SHAPE"], "'model.target' 'user_flow_model:SHAPE' is not callable"),
    (["model.target=user_flow_model:gaussian_flow", "model.sample_shape=[2,0]"], "'model.sample_shape' must be"),
    (["model.checkpoint=/no/such/file.pt"], "'model.checkpoint' '/no/such/file.pt' is not a file"),
    (["model.kwargs.mean=1"], "'model.kwargs' go to model.target's factory"),
])
def test_config_errors_name_the_key(tmp_path, overrides, match):
    with pytest.raises(ConfigError, match=match):
        _cfg(tmp_path, *overrides)


def test_errors_found_when_the_model_is_built(tmp_path):
    with pytest.raises(ConfigError, match=r"'model.sample_shape' \[3, 1\] has 3 entries but data.source .* "
                                          "dimension 2"):
        load_or_pretrain(_cfg(tmp_path, *USER, "model.sample_shape=[3,1]", "pretrain.steps=0"), log=lambda _: None)
    with pytest.raises(ConfigError, match="'model.target' .* failed when called with model.kwargs"):
        load_or_pretrain(_cfg(tmp_path, *USER, "model.kwargs.wrong=1", "pretrain.steps=0"), log=lambda _: None)
    with pytest.raises(ConfigError, match=r"'model.target' .*forward\(x \(2, \*\[2\]\)"):  # flat shape: (n, 2)
        load_or_pretrain(_cfg(tmp_path, *USER, "model.sample_shape=[]", "pretrain.steps=0"), log=lambda _: None)


def test_readme_example_builds_pretrains_and_reloads(tmp_path, import_path):
    """README's "Bring your own model": its module and config load, pretrain a few steps, and the cached state
    loads into the user's own module."""
    import re
    from pathlib import Path

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    start = readme.index("## Bring your own model")
    section = readme[start:readme.index("\n### ", start)]  # the section's own text, before its subsections
    module, config, command = (body for _, body in re.findall(r"```(\w+)\n(.*?)```", section, re.S))
    (tmp_path / "my_flow.py").write_text(module)
    (tmp_path / "my_flow.yaml").write_text(config)
    assert "tfft run my_flow.yaml" in command
    import_path(str(tmp_path))
    cfg = load_config(tmp_path / "my_flow.yaml", [f"pretrain.cache_dir={tmp_path / 'cache'}", "pretrain.steps=3",
                                                  "pretrain.n_samples=64", "pretrain.batch_size=16"])
    base = load_or_pretrain(cfg, log=lambda _: None)
    assert base.config["sample_shape"] == [1, 8, 8] and base.config["dim"] == 64
    import my_flow

    my_flow.conv_flow(**cfg.model.kwargs).load_state_dict(base.state_dict)
    assert build_model(base.config, base.state_dict)(torch.randn(3, 64), torch.rand(3)).shape == (3, 64)


def test_editing_the_user_models_file_changes_the_cache_key(tmp_path, import_path):
    """A cached base model made by old code is not loaded into the edited model: the factory's file is hashed."""
    folder = tmp_path / "mods"
    folder.mkdir()
    module = folder / "edited_flow_model.py"
    body = "from user_flow_model import gaussian_flow\n\ndef make(**kwargs):\n    return gaussian_flow(**kwargs)\n"
    module.write_text(body)
    import_path(folder)
    overrides = [*USER, "model.target=edited_flow_model:make"]
    before = pretrain_key(_cfg(tmp_path, *overrides))
    assert pretrain_key(_cfg(tmp_path, *overrides)) == before  # stable while the file is unchanged
    module.write_text(body + "# edited\n")
    assert pretrain_key(_cfg(tmp_path, *overrides)) != before


def test_editing_a_module_the_factory_imports_changes_the_cache_key(tmp_path, import_path):
    """The factory's own file is unchanged; a project module it imports (directly or through another) is edited."""
    folder = tmp_path / "pkgmods"
    (folder / "mypkg").mkdir(parents=True)
    (folder / "mypkg" / "__init__.py").write_text("")
    helper = folder / "mypkg" / "layers.py"
    helper.write_text("WIDTH = 1\n")
    (folder / "mypkg" / "middle.py").write_text("from .layers import WIDTH\n")
    (folder / "mypkg" / "flow.py").write_text(
        "from mypkg.middle import WIDTH\nfrom user_flow_model import gaussian_flow\n\n"
        "def make(**kwargs):\n    return gaussian_flow(**kwargs)\n")
    import_path(folder)
    overrides = [*USER, "model.target=mypkg.flow:make"]
    before = pretrain_key(_cfg(tmp_path, *overrides))
    assert pretrain_key(_cfg(tmp_path, *overrides)) == before
    helper.write_text("WIDTH = 2\n")
    assert pretrain_key(_cfg(tmp_path, *overrides)) != before


_GLOBAL_RNG_MODULE = '''
import numpy as np

CALLS = []


def source(n, seed):
    """Data from numpy's global generator (a source that ignores its seed), recording each call's n and rows."""
    x = np.random.standard_normal((n, 2))
    CALLS.append((n, x))
    return x


def broken(**kwargs):
    raise RuntimeError("no such layer")
'''


def test_a_broken_model_fails_before_the_full_data_draw_and_the_draw_is_unchanged(tmp_path, import_path):
    """The model is built from a 16-row probe of the data, so a factory error comes before pretraining draws
    its n rows; the full draw then sees the random state the probe saw, so its data are what they were."""
    (tmp_path / "global_rng_source.py").write_text(_GLOBAL_RNG_MODULE)
    import_path(tmp_path)
    import global_rng_source

    common = ["data.source=global_rng_source:source", "pretrain.n_samples=500", "pretrain.steps=2",
              "pretrain.batch_size=8"]
    with pytest.raises(ConfigError, match="'model.target' 'global_rng_source:broken' failed"):
        load_or_pretrain(_cfg(tmp_path, *common, "model.target=global_rng_source:broken"), log=lambda _: None)
    assert [n for n, _ in global_rng_source.CALLS] == [16]  # the 500 rows were never drawn
    global_rng_source.CALLS.clear()
    np.random.seed(7)
    load_or_pretrain(_cfg(tmp_path, *common, "pretrain.cache_dir=" + str(tmp_path / "other")), log=lambda _: None)
    (probe_n, probe), (full_n, full) = global_rng_source.CALLS
    np.random.seed(7)
    assert (probe_n, full_n) == (16, 500)
    np.testing.assert_array_equal(full, np.random.standard_normal((500, 2)))  # as if the probe had not run
    np.testing.assert_array_equal(probe, full[:16])
