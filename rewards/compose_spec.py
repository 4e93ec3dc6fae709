"""Term specs of :class:`rewards.compose.WeightedSum`: ``{target, kwargs, weight, name}`` checked, terms named.

    terms[i] = {target: "package.module:Name", kwargs: {...}?, weight: float?, name: str?}
        -> (target, kwargs dict, weight float, name or None)

A name is a bank column's suffix (``term.<name>``): letters, digits, '_' and '-', not starting with '-'. A term
without one is named after its target's attribute (:func:`default_name`), made unique with ``_2``, ``_3``...
(:func:`unique_name`). Errors are ValueErrors naming the term's index and key.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["TERM_KEYS", "NAME", "default_name", "unique_name", "check_spec"]

TERM_KEYS = ("target", "kwargs", "weight", "name")
NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_\-]*\Z")


def default_name(target: str) -> str:
    """``package.module:Attr.inner`` -> ``inner``; characters a column name cannot hold become '_'."""
    attr = target.partition(":")[2].rsplit(".", 1)[-1]
    name = re.sub(r"[^A-Za-z0-9_\-]", "_", attr) or "term"
    return name if NAME.match(name) else "_" + name


def unique_name(name: str, taken: set[str]) -> str:
    """``name``, or ``name_k`` with the smallest k >= 2 not in ``taken``."""
    if name not in taken:
        return name
    k = 2
    while f"{name}_{k}" in taken:
        k += 1
    return f"{name}_{k}"


def check_spec(i: int, spec: Any) -> tuple[str, dict[str, Any], float, str | None]:
    """(target, kwargs, weight, name or None) of ``terms[i]``; ValueError naming the index and key."""
    where = f"WeightedSum: terms[{i}]"
    if not isinstance(spec, Mapping):
        raise ValueError(f"{where} must be a mapping with keys {', '.join(TERM_KEYS)}; got {spec!r}")
    unknown = sorted(str(k) for k in spec if k not in TERM_KEYS)
    if unknown:
        raise ValueError(f"{where} has unknown key(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(TERM_KEYS)}")
    target = spec.get("target")
    if target is None:
        raise ValueError(f"{where} lacks 'target' (an import path 'package.module:Name')")
    if not isinstance(target, str) or ":" not in target:
        raise ValueError(f"{where}.target must be an import path 'package.module:Name', got {target!r}")
    kwargs = spec.get("kwargs")
    if kwargs is not None and not isinstance(kwargs, Mapping):
        raise ValueError(f"{where}.kwargs must be a mapping of keyword arguments, got {kwargs!r}")
    weight = spec.get("weight", 1.0)
    ok = isinstance(weight, (int, float, np.integer, np.floating)) and not isinstance(weight, bool)
    if not ok or not math.isfinite(float(weight)):
        raise ValueError(f"{where}.weight must be a finite number, got {weight!r}")
    name = spec.get("name")
    if name is not None and (not isinstance(name, str) or not NAME.match(name)):
        raise ValueError(
            f"{where}.name must be a non-empty string of letters, digits, '_' and '-' (it names the bank "
            f"column term.<name>), got {name!r}"
        )
    return target, dict(kwargs or {}), float(weight), name
