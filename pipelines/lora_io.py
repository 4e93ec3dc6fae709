"""LoRA adapters in and out of a run: peft's saved format, merged weights (``finetune.lora``).

The adapter goes to ``checkpoint/`` as peft's ``save_pretrained`` writes it (``adapter_model.safetensors`` +
``adapter_config.json``), loadable with ``peft.PeftModel.from_pretrained``; with ``merge`` also
``merged.safetensors``, the network's state dict with W + (alpha / r) B A (the keys of the network without LoRA).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable

from torch import Tensor, nn

__all__ = ["ADAPTER_FILE", "MERGED_FILE", "adapter_state", "load_adapter", "merged_state", "read_adapter",
           "save_lora_checkpoint", "driver_lora", "lora_outcome"]

ADAPTER_FILE = "adapter_model.safetensors"
MERGED_FILE = "merged.safetensors"
State = dict[str, Tensor]


def adapter_state(peft_model: nn.Module) -> dict[str, Tensor]:
    """The adapter's weights in peft's saved format (keys without the adapter name), detached, on the CPU."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(peft_model).items()}


def load_adapter(peft_model: nn.Module, state: dict[str, Tensor]) -> None:
    """Load adapter weights (peft's format) into ``peft_model``; a key it does not have is an error."""
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(peft_model, state)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected:
        raise ValueError(f"adapter keys not in the model: {unexpected[:5]}")


def merged_state(peft_model: nn.Module) -> dict[str, Tensor]:
    """The user network's state dict with every adapter merged, W + (alpha / r) B A (``peft_model`` untouched)."""
    merged = copy.deepcopy(peft_model).merge_and_unload()
    return {k: v.detach().cpu().clone() for k, v in merged.state_dict().items()}


def read_adapter(directory: str | Path) -> dict[str, Tensor]:
    """The adapter weights a run saved in ``directory`` (``adapter_model.safetensors``)."""
    from safetensors.torch import load_file

    return load_file(str(Path(directory) / ADAPTER_FILE), device="cpu")


def save_lora_checkpoint(
    directory: str | Path, lora: Any, *, merge: bool,
) -> list[str]:
    """Write ``lora.peft`` (a `pipelines.lora.LoraModel`'s PeftModel) with ``save_pretrained`` into ``directory`` (and ``merged.safetensors`` when ``merge``);
    returns the files written."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lora.peft.save_pretrained(str(directory))
    files = [ADAPTER_FILE, "adapter_config.json"]
    if merge:
        state = {k: v.contiguous() for k, v in merged_state(lora.peft).items()}
        save_file(state, str(directory / MERGED_FILE))
        files.append(MERGED_FILE)
    return files


def driver_lora(lora: Any, model_config: dict[str, Any], base_state: State, init_adapter: State | None,
                 log: Callable[[str], None]) -> Any:
    """The LoRA model on the driver (None without LoRA): it counts the parameters for the log line, and after
    training it takes the kept adapter, to merge and save."""
    if lora is None:
        return None
    from pipelines.lora import build_lora_model, count_parameters, lora_log_line

    model = build_lora_model(model_config, base_state, lora, adapter=init_adapter)
    log(lora_log_line(lora, *count_parameters(model.velocity)))
    return model


def lora_outcome(lora_model: Any, lora: Any, adapter: State | None,
                  peak_memory: int | None) -> tuple[State, dict[str, Any]]:
    """(merged state with ``adapter`` loaded (None: keep the starting one), ``summary.json["lora"]``)."""
    from pipelines.lora import count_parameters

    if adapter is not None:
        load_adapter(lora_model.peft, adapter)
    trainable, total = count_parameters(lora_model.velocity)
    record = {**lora.to_dict(), "target_modules": list(lora_model.targets), "patterns": list(lora.target_modules),
              "trainable": trainable, "total": total}
    if peak_memory is not None:
        record["peak_memory_bytes"] = int(peak_memory)
    return merged_state(lora_model.peft), record
