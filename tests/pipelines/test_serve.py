"""A reward held once by a Ray Serve application (``reward.serve``), shared by a sweep's trials.

A two-trial sweep (alpha 0.1 and 0.2, adjoint matching, so the training workers ask the application for reward
gradients) whose reward counts its constructions in a file: the reward is built once, by the single replica,
and never on the driver, the reward actors or the training workers; both trials finish; the application
tfft started is deleted at the end (the sweep's log says so). The served rewards equal the reward evaluated
directly on the bank.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.bankio import read_bank
from pipelines.cli import main

pytestmark = [pytest.mark.ray, pytest.mark.slow]

COUNTING = '''
import os
from rewards.toy2d import TailReward2D

class CountingToy(TailReward2D):
    """The 2-D reward, appending one line (its pid) to ``log`` each time it is built."""
    def __init__(self, log, **kwargs):
        super().__init__(**kwargs)
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\\n")
        self.log = log
'''

SWEEP = """
seed: 0
reward:
  target: counting_reward:CountingToy
  kwargs: {{log: "{log}"}}
  serve: {{enabled: true, name: test-served-reward, num_cpus: 0.25}}
pretrain: {{steps: 200, n_samples: 2000}}
sampler: {{steps: 10}}
bank: {{size: 256, shard_size: 256, sampler: {{num_cpus: 0.25}}, reward: {{num_cpus: 0.25}}}}
eval: {{size: 256}}
finetune: {{solver: adjoint, steps: 6, batch_size: 64, log_every: 3, checkpoint_every: 6}}
sweep:
  parameters:
    objective.alpha: {{grid: [0.1, 0.2]}}
  max_concurrent_trials: 2
"""


@pytest.fixture(scope="module")
def served_sweep(tmp_path_factory):
    import ray

    root = tmp_path_factory.mktemp("serve")
    (root / "user").mkdir()
    (root / "user" / "counting_reward.py").write_text(COUNTING)
    old = os.environ.get("PYTHONPATH", "")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(root / "user"), old) if p)
    sys.path.insert(0, str(root / "user"))
    log = root / "constructions.log"
    config = root / "sweep.yaml"
    config.write_text(SWEEP.format(log=log))
    if ray.is_initialized():
        ray.shutdown()
    output = io.StringIO()
    try:
        with contextlib.redirect_stdout(output):
            code = main(["sweep", str(config), "--out", str(root / "out"), f"pretrain.cache_dir={root / 'cache'}",
                        f"bank.cache_dir={root / 'rewards'}", f"tracking.uri=sqlite:///{root / 'mlflow.db'}",
                        "ray.num_cpus=2"])
    finally:
        if ray.is_initialized():
            ray.shutdown()
        sys.path.remove(str(root / "user"))
        os.environ["PYTHONPATH"] = old
    return {"root": root, "code": code, "log": log, "output": output.getvalue()}


def test_a_sweep_builds_the_served_reward_once_and_both_trials_finish(served_sweep):
    root = served_sweep["root"]
    assert served_sweep["code"] == 0
    assert len(served_sweep["log"].read_text().splitlines()) == 1  # one replica, nothing else built it
    output = served_sweep["output"]
    assert output.count("[serve] starting application 'test-served-reward'") == 1
    assert "[serve] using the running application 'test-served-reward'" in output  # the second trial joined it
    assert "[serve] deleted application 'test-served-reward'" in output
    trials = json.loads((root / "out" / "sweep.json").read_text())["trials"]
    assert len(trials) == 2
    for trial in trials:
        summary = json.loads((root / "out" / "trials" / trial["name"] / "summary.json").read_text())
        assert summary["solver"] == "adjoint" and summary["finetuned"]["n"] == 256
    banks = list((root / "out").rglob("bank_base.parquet"))
    assert banks
    from rewards.toy2d import TailReward2D

    bank = read_bank(banks[0])
    direct = TailReward2D().evaluate(torch.as_tensor(np.array(bank.x))).rewards.numpy()
    np.testing.assert_allclose(bank.reward, direct, rtol=0, atol=0)
