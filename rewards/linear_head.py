"""Linear and small-MLP heads read from state dict files: the work of :func:`rewards.image.load_linear_head`.

    file (.safetensors | .pt/.pth) -> state {"<prefix><i>.weight": (out_i, in_i), "<prefix><i>.bias": (out_i,)}
        -> nn.Sequential(Linear(in_0, out_0), [act], Linear(out_0, out_1), ..., Linear(., 1))

Layers are taken in the natural order of their prefixes (``layers.2`` before ``layers.10``); a head must chain
(each layer's input is the previous one's output) and end in one value. Errors are ValueErrors naming
``reward.kwargs.head`` (or ``.activation``) and the file.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = ["ACTIVATIONS", "read_state_dict", "layer_prefixes", "chain_linear"]

ACTIVATIONS = {"none": None, "relu": nn.ReLU, "gelu": nn.GELU}


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """The tensors of a ``.safetensors`` file, or of a ``.pt``/``.pth`` file read with ``weights_only=True`` (a
    ``{"state_dict": {...}}`` wrapper unwrapped), on the CPU."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    return state


def layer_prefixes(state: dict[str, Tensor], path: Path) -> list[str]:
    """The prefixes of the ``*weight`` keys (``layers.0.``, ..., or '' for a bare ``weight``), in natural order;
    ValueError when there is none."""
    prefixes = sorted({k[: -len("weight")] for k in state if k.endswith("weight")},
                      key=lambda p: [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", p)])
    if not prefixes:
        raise ValueError(f"'reward.kwargs.head': {str(path)!r} holds no '*weight' tensors")
    return prefixes


def chain_linear(state: dict[str, Tensor], prefixes: list[str], activation: str, path: Path) -> nn.Sequential:
    """One ``nn.Linear`` per prefix with the state's weight (out, in) and bias (out,), ``activation`` (a key of
    :data:`ACTIVATIONS`) between consecutive layers; in eval mode, without gradients."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"'reward.kwargs.activation' must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    layers: list[nn.Module] = []
    for prefix in prefixes:
        weight = state[prefix + "weight"]
        if weight.dim() != 2 or (layers and weight.shape[1] != layers[-1].out_features):
            raise ValueError(f"'reward.kwargs.head': {str(path)!r}: layer {prefix}weight of shape "
                             f"{tuple(weight.shape)} does not chain with the previous layer")
        bias = state.get(prefix + "bias")
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if bias is not None:
                linear.bias.copy_(bias)
        if layers and ACTIVATIONS[activation] is not None:
            layers.append(ACTIVATIONS[activation]())
        layers.append(linear)
    if layers[-1].out_features != 1:
        raise ValueError(f"'reward.kwargs.head': {str(path)!r}: the last layer outputs {layers[-1].out_features} "
                         "values, not 1")
    return nn.Sequential(*layers).eval().requires_grad_(False)
