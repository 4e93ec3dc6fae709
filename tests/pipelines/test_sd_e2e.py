"""The diffusers path end to end: ``tfft run tune_configs/sd_tiny_clip.yaml`` on a tiny random SD-class pipeline
(UNet, CLIP text encoder and tokenizer, VAE, scheduler, all built from configs and saved locally) with two prompts
as conditions and the CLIP score of the decoded images as the reward.

Checks what the shipped config promises: every stage runs, each prompt gets its own bank rows, threshold and
statistics, the reward sees each row's own prompt, and the fine-tuned checkpoint is a state dict of the UNet
alone (it loads into a plain ``UNet2DConditionModel``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.bankio import read_bank
from pipelines.cli import main

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).parents[2]
CONFIG = ROOT / "tune_configs/sd_tiny_clip.yaml"
PROMPTS = ["a photo of a cat", "a photo of a dog"]
SMALL = ["bank.size=64", "bank.shard_size=64", "eval.size=64", "finetune.steps=4", "finetune.batch_size=8",
         "sampler.steps=8", "finetune.log_every=2", "finetune.checkpoint_every=2", "finetune.backend=local",
         "finetune.loss_chunk=2", "finetune.gradient_checkpointing=true", "finetune.adjoint_chunk=3",
         "finetune.checkpoint_adjoint=false"]  # the large-model memory options run


@pytest.fixture(scope="module")
def sd_run(tmp_path_factory, local_ray):
    """The shipped config on the tiny pipeline, on the session's shared Ray (conftest.py)."""
    from pipelines.adapters.tiny import write_tiny_clip, write_tiny_sd

    root = tmp_path_factory.mktemp("sd_e2e")
    write_tiny_sd(root / "sd")
    write_tiny_clip(root / "clip")
    out = root / "run"
    code = main(["run", str(CONFIG), "--out", str(out), f"task.dir={root}", *SMALL,
                 f"tracking.uri=sqlite:///{root / 'mlflow.db'}", f"bank.cache_dir={root / 'rewards'}"])
    return root, out, code


def test_runs_every_stage_per_prompt(sd_run):
    root, out, code = sd_run
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["conditions"] == PROMPTS
    for prompt in PROMPTS:
        block = summary["per_condition"][prompt]
        assert {"threshold", "base", "finetuned", "target"} <= set(block)
        assert block["base"]["n"] == 64 and np.isfinite(block["threshold"]["eta"])
    bank = read_bank(out / "bank_base.parquet")
    assert bank.conditions == PROMPTS and np.bincount(bank.cond).tolist() == [64, 64]
    assert bank.x.shape == (128, 4 * 8 * 8)


def test_the_reward_scores_each_row_against_its_own_prompt(sd_run):
    """The base bank's rewards are the CLIP scores of the decoded latents with the row's prompt, not another's."""
    from rewards.image import LatentDecoded

    root, out, _ = sd_run
    bank = read_bank(out / "bank_base.parquet")
    reward = LatentDecoded(vae_path=str(root / "sd"), reward="rewards.image:ClipScore",
                           reward_kwargs={"path": str(root / "clip")})
    rows = np.r_[0:4, 64:68]
    x = torch.as_tensor(bank.x[rows])
    own = [bank.conditions[i] for i in bank.cond[rows]]
    swapped = [PROMPTS[1 - PROMPTS.index(p)] for p in own]
    want = reward.evaluate(x, cond=own).rewards.numpy()
    other = reward.evaluate(x, cond=swapped).rewards.numpy()
    assert np.allclose(bank.reward[rows], want, atol=1e-4)
    assert not np.allclose(bank.reward[rows], other, atol=1e-4)


def test_the_checkpoint_is_the_unets_state_dict(sd_run):
    from diffusers import UNet2DConditionModel

    root, out, _ = sd_run
    state = torch.load(out / "checkpoint" / "model.pt", map_location="cpu", weights_only=True)["state_dict"]
    unet = UNet2DConditionModel.from_pretrained(root / "sd", subfolder="unet", local_files_only=True)
    assert set(state) == set(unet.state_dict())
    unet.load_state_dict(state, strict=True)
