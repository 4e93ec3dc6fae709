"""The prompt grammar of the scenes task: ``"a <colour> <shape>"``.

Colours are the three primaries of RGB (each names one channel); shapes are a disc and a square of the same
area. Every grammatical prompt can be rendered (`rewards.scenes.render`) and scored
(`rewards.scenes.reward`); :data:`PROMPTS` is the default set the configs train on.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["COLOURS", "SHAPES", "PROMPTS", "Prompt", "parse_prompt", "all_prompts"]

COLOURS: dict[str, int] = {"red": 0, "green": 1, "blue": 2}
"""Colour name -> the RGB channel it names."""

SHAPES: tuple[str, ...] = ("disc", "square")

PROMPTS: tuple[str, ...] = ("a red disc", "a green square", "a blue disc", "a red square")
"""The default prompts: each colour once, each shape twice, and red with both shapes (so the shape must be
read from the prompt, not only the colour)."""


@dataclass(frozen=True)
class Prompt:
    """A parsed prompt: its text, the colour's name and RGB channel, the shape."""

    text: str
    colour: str
    channel: int
    shape: str


def all_prompts() -> tuple[str, ...]:
    """Every prompt of the grammar (3 colours x 2 shapes)."""
    return tuple(f"a {c} {s}" for c in COLOURS for s in SHAPES)


def parse_prompt(text: str) -> Prompt:
    """``"a red disc"`` -> Prompt('a red disc', 'red', 0, 'disc'); ValueError naming the prompt otherwise."""
    if not isinstance(text, str):
        raise ValueError(f"a scenes prompt must be a string, got {type(text).__name__} {text!r}")
    words = text.split()
    if len(words) != 3 or words[0] != "a" or words[1] not in COLOURS or words[2] not in SHAPES:
        raise ValueError(
            f"unknown scenes prompt {text!r}: prompts read 'a <colour> <shape>' with colour in "
            f"{sorted(COLOURS)} and shape in {list(SHAPES)}, e.g. {PROMPTS[0]!r}"
        )
    return Prompt(text=text, colour=words[1], channel=COLOURS[words[1]], shape=words[2])
