"""A user's flow model in the library's flat interface (DESIGN.md section 8: bring your own model).

The user's network works on samples of any shape: ``network(x (n, *sample_shape), t (n,), cond) -> (n,
*sample_shape)``, the velocity of the linear interpolant x_t = t x1 + (1 - t) x0 (t = 0 noise, t = 1 data,
DESIGN.md section 2). The library (samplers, adjoint matching, weighted flow matching) works on flat vectors,
``velocity(x (n, d), t (n,)) -> (n, d)`` with d = prod(sample_shape). :class:`FlatVelocity` reshapes in and
flattens out; nothing else changes, so the law of the flat samples is the law of the user's samples, flattened
in row-major (C) order.

``cond`` is the slot for conditions (prompts, labels): without conditions the adapter passes ``None``; with
``conditions`` (the list of condition values) the library's ``cond``, a LongTensor (n,) of indices into that
list, reaches the network as the python list of the n rows' values, ``[conditions[i] for i in cond]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from tfft.model import _expand_time

__all__ = ["FlatVelocity", "check_sample_shape", "share_child_state"]


def check_sample_shape(sample_shape: Sequence[int]) -> tuple[int, ...]:
    """The shape as a tuple of positive ints; ValueError otherwise."""
    shape = tuple(sample_shape)
    if not shape or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in shape):
        raise ValueError(f"sample_shape must be a non-empty list of positive ints, got {list(sample_shape)!r}")
    return shape


class FlatVelocity(nn.Module):
    """v(x (n, d), t (n,)[, cond (n,)]) = flatten(network(x.reshape(n, *sample_shape), t, values)), d = prod(sample_shape).

    ``values`` is None without conditions, else the list of the rows' condition values (module docstring).

    The wrapper adds no parameters, and its state dict is the network's own (same keys, no prefix), so that a
    state saved from the wrapper loads into the user's module and back: ``checkpoint/model.pt`` of a run is
    a state dict of the user's network.

    Args:
        network: ``forward(x (n, *sample_shape), t (n,), cond) -> (n, *sample_shape)``.
        sample_shape: shape of one sample, e.g. (3, 8, 8); its product is the flat dimension d.
        conditions: the condition values (ints, floats or strings), or None for an unconditional model.
    """

    def __init__(self, network: nn.Module, sample_shape: Sequence[int], conditions: Sequence[Any] | None = None) -> None:
        super().__init__()
        self.conditions = None if conditions is None else list(conditions)
        self.network = network
        self.sample_shape = check_sample_shape(sample_shape)
        self.dim = math.prod(self.sample_shape)
        share_child_state(self, "network")

    def forward(self, x: Tensor, t: Tensor | float, cond: Tensor | None = None) -> Tensor:
        """x (n, d), t scalar or (n,), cond (n,) condition indices (with conditions) -> (n, d)."""
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must have shape (n, {self.dim}) for sample_shape {self.sample_shape}, "
                             f"got {tuple(x.shape)}")
        n = x.shape[0]
        out = self.network(x.reshape(n, *self.sample_shape), _expand_time(t, x), self._values(cond, n))
        if tuple(out.shape) != (n, *self.sample_shape):
            raise ValueError(f"the network returned a velocity of shape {tuple(out.shape)} for x of shape "
                             f"{(n, *self.sample_shape)}; it must return the shape of x")
        return out.reshape(n, self.dim)

    def _values(self, cond: Tensor | None, n: int) -> list[Any] | None:
        """The rows' condition values, or None without conditions."""
        if self.conditions is None:
            if cond is not None:
                raise ValueError("this model has no conditions but got cond")
            return None
        if cond is None or cond.shape != (n,):
            raise ValueError(f"this model is conditional ({len(self.conditions)} conditions): cond must have shape "
                             f"({n},), got {None if cond is None else tuple(cond.shape)}")
        return [self.conditions[i] for i in cond.tolist()]


def share_child_state(wrapper: nn.Module, child: str) -> None:
    """Make ``wrapper``'s state dict its child's: keys ``<child>.k`` are saved as ``k`` and loaded back.

    For wrappers that add no state of their own (:class:`FlatVelocity`, ``tfft.diffusion.VPDiffusionFlow``): a
    checkpoint of the user's network loads into the wrapper, and the wrapper's state into the network. The
    per-module metadata (versions) travels with the keys. Works at any depth of nesting.
    """
    prefix_of_child = child + "."

    def drop(module: nn.Module, state: dict[str, Any], prefix: str, local_metadata: Any) -> None:
        _rename(state, prefix + prefix_of_child, prefix)
        metadata = getattr(state, "_metadata", None)
        if metadata is not None:
            inner = metadata.pop(prefix + child, None)  # the child's own entry stands for the wrapper's
            if inner is not None:
                metadata[prefix[:-1]] = inner
            _rename(metadata, prefix + prefix_of_child, prefix)

    def add(module: nn.Module, state: dict[str, Any], prefix: str, *args: Any) -> None:
        _rename(state, prefix, prefix + prefix_of_child)
        metadata = getattr(state, "_metadata", None)  # only on the dict at the top of the load
        if metadata is not None:
            _rename(metadata, prefix, prefix + prefix_of_child, skip=prefix[:-1])
            if prefix[:-1] in metadata:
                metadata[prefix + child] = metadata[prefix[:-1]]

    wrapper.register_state_dict_post_hook(drop)
    wrapper.register_load_state_dict_pre_hook(add)


def _rename(mapping: dict[str, Any], old: str, new: str, skip: str | None = None) -> None:
    """Replace the prefix ``old`` by ``new`` in every key that has it (except ``skip``)."""
    for key in [k for k in mapping if k.startswith(old) and k != skip]:
        mapping[new + key[len(old):]] = mapping.pop(key)
