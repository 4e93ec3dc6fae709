"""GPU pools: samplers on CUDA (``bank.sampler.num_gpus``) and DDP workers on GPUs (``finetune.use_gpu``).

Skipped on machines without a CUDA device; the same config runs on CPU elsewhere in the suite.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.ray,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

ROOT = Path(__file__).parents[2]


def test_gpu_sampler_and_training_workers(tmp_path):
    import ray

    from pipelines.cli import main

    if ray.is_initialized():
        ray.shutdown()
    workers = 1 if torch.cuda.device_count() < 2 else 2
    args = [
        "run", str(ROOT / "tune_configs/toy2d_right.yaml"), "--out", str(tmp_path / "gpu"),
        "bank.size=2000", "eval.size=2000", "pretrain.steps=300", "finetune.steps=40", "finetune.log_every=10",
        "bank.sampler.num_gpus=0.5", "finetune.use_gpu=true", f"finetune.num_workers={workers}",
        f"pretrain.cache_dir={tmp_path / 'cache'}", "tracking.enabled=false",
    ]
    try:
        assert main(args) == 0
    finally:
        ray.shutdown()
    summary = json.loads((tmp_path / "gpu" / "summary.json").read_text())
    assert summary["finetuned"]["n_valid"] == 2000
    assert summary["base"]["n_valid"] == 2000 and summary["finetune_seconds"] is not None
