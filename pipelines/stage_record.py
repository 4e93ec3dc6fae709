"""What a stage did in this call, for ``summary.json["stages"]``: built, reused or resumed, how long it took, and
the stage's own counts.

    built    nothing of the stage was stored: all its work ran in this call
    resumed  part of its work was stored by an earlier call (bank shards, a training checkpoint) and the rest ran
    reused   its finished result was stored (the bank file, ``checkpoint/model.pt``, the cached base model)

A stage whose work comes in parts (threshold refinement's fine-tuning rounds) is built when every part was
built, reused when every part was reused, and resumed otherwise (:func:`combined_status`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

__all__ = ["BUILT", "REUSED", "RESUMED", "StageRecord", "combined_status"]

BUILT, REUSED, RESUMED = "built", "reused", "resumed"
_STATUSES = (BUILT, REUSED, RESUMED)


@dataclass(frozen=True)
class StageRecord:
    """One stage's record: ``status`` (module doc), wall ``seconds`` of this call, and ``counts`` (the stage's
    numbers, e.g. a bank's ``sampled`` and ``from_shards``; ints, floats or None)."""

    status: str
    seconds: float
    counts: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.status not in _STATUSES:
            raise ValueError(f"stage status {self.status!r} is not one of {_STATUSES}")

    def to_dict(self) -> dict[str, Any]:
        """``{"status", "seconds", **counts}`` (JSON-able)."""
        return {"status": self.status, "seconds": float(self.seconds), **self.counts}


def combined_status(statuses: Sequence[str]) -> str:
    """The status of a stage made of parts with ``statuses``: built or reused when all parts agree, else resumed."""
    if not statuses:
        raise ValueError("a stage has at least one part")
    first = statuses[0]
    return first if first != RESUMED and all(s == first for s in statuses) else RESUMED
