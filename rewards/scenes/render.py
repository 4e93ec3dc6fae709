"""The scenes renderer and data source: one object of the prompt's colour and shape on a dark background.

Images are 16 x 16 RGB in [-1, 1], flattened row-major from (3, 16, 16) to 768 numbers (the layout of
``model.sample_shape: [3, 16, 16]``). Working in intensity u = (x + 1) / 2 in [0, 1], an image is

    u(p) = a(p) c_obj + (1 - a(p)) c_bg + noise,   a(p) = sigmoid((R_eff - dist(p, centre)) / edge),

with dist the Euclidean distance (disc, radius R) or the Chebyshev distance (square, half-side
R sqrt(pi) / 2, the disc's area), edge = 0.5 pixel (soft edges), c_bg a dark grey (u in [0.1, 0.35], each channel
jittered by 0.02) and pixel noise N(0, 0.02^2). Each draw is one of four kinds:

| kind | share (default) | object |
|---|---|---|
| body | 1 - tail - failure (0.85) | R ~ U[2.5, 4.5], named colour: its channel U[0.75, 1], the others U[0, 0.2] |
| large (the rare tail) | ``tail_fraction`` (0.05) | R ~ U[5.5, 6.5], named colour as the body |
| washed-out (failure) | ``failure_fraction`` / 2 (0.05) | body size; channel U[0.4, 0.55], the others U[0.3, 0.45] |
| wrong colour (failure) | ``failure_fraction`` / 2 (0.05) | body size and saturation, another primary colour |

The centre is uniform in [0.8 R, 16 - 0.8 R] on both axes, so objects stay (almost) inside the frame.
"""

from __future__ import annotations

import math
import zlib

import numpy as np

from rewards.scenes.prompts import COLOURS, parse_prompt

__all__ = ["SIZE", "SAMPLE_SHAPE", "KINDS", "render", "draw_scenes", "sample_scenes"]

SIZE = 16
SAMPLE_SHAPE = (3, SIZE, SIZE)
KINDS = ("body", "large", "washed", "wrong")
_EDGE = 0.5
_NOISE = 0.02


def render(shape: str, centre: np.ndarray, radius: np.ndarray, obj: np.ndarray, bg: np.ndarray,
           noise: np.ndarray | None = None) -> np.ndarray:
    """Images (n, 3, 16, 16) in [-1, 1] of n objects of one ``shape`` ('disc' or 'square').

    Args:
        centre: (n, 2) object centres (row, column) in pixel units, pixel p's centre at p + 0.5.
        radius: (n,) disc radius R (a square gets half-side R sqrt(pi)/2, the same area).
        obj: (n, 3) object colour in intensity units u in [0, 1].
        bg: (n, 3) background colour in u.
        noise: optional (n, 3, 16, 16) noise in u, added before clipping.
    """
    grid = np.arange(SIZE) + 0.5
    dy = grid[None, :, None] - centre[:, 0, None, None]
    dx = grid[None, None, :] - centre[:, 1, None, None]
    if shape == "disc":
        dist, reach = np.sqrt(dx**2 + dy**2), radius
    elif shape == "square":
        dist, reach = np.maximum(np.abs(dx), np.abs(dy)), radius * math.sqrt(math.pi) / 2
    else:
        raise ValueError(f"unknown shape {shape!r}")
    a = 1.0 / (1.0 + np.exp(-(reach[:, None, None] - dist) / _EDGE))  # (n, 16, 16)
    u = a[:, None] * obj[:, :, None, None] + (1.0 - a[:, None]) * bg[:, :, None, None]
    if noise is not None:
        u = u + noise
    return np.clip(2.0 * u - 1.0, -1.0, 1.0)


def draw_scenes(n: int, seed: int, cond: str, *, tail_fraction: float = 0.05,
                failure_fraction: float = 0.10) -> tuple[np.ndarray, np.ndarray]:
    """n images of prompt ``cond`` (n, 3, 16, 16) and their kinds (n,) as indices into :data:`KINDS`.

    Deterministic in (seed, cond): the generator is seeded by seed and a checksum of the prompt, so that two
    prompts drawn with the same seed are independent.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not (0 <= tail_fraction and 0 <= failure_fraction and tail_fraction + failure_fraction <= 1):
        raise ValueError(f"tail_fraction {tail_fraction} and failure_fraction {failure_fraction} must be >= 0 "
                         "with a sum <= 1")
    prompt = parse_prompt(cond)
    rng = np.random.default_rng([int(seed), zlib.crc32(cond.encode())])
    shares = np.array([1 - tail_fraction - failure_fraction, tail_fraction, failure_fraction / 2,
                       failure_fraction / 2])
    kind = rng.choice(len(KINDS), size=n, p=shares / shares.sum())
    large = kind == 1
    radius = np.where(large, rng.uniform(5.5, 6.5, n), rng.uniform(2.5, 4.5, n))
    centre = rng.uniform(0.8 * radius[:, None], SIZE - 0.8 * radius[:, None], (n, 2))
    channel = np.full(n, prompt.channel)
    wrong = kind == 3
    channel[wrong] = (prompt.channel + rng.integers(1, len(COLOURS), int(wrong.sum()))) % len(COLOURS)
    hi, lo = rng.uniform(0.75, 1.0, n), rng.uniform(0.0, 0.2, (n, 3))
    washed = kind == 2
    hi[washed] = rng.uniform(0.4, 0.55, int(washed.sum()))
    lo[washed] = rng.uniform(0.3, 0.45, (int(washed.sum()), 3))
    obj = lo.copy()
    obj[np.arange(n), channel] = hi
    bg = rng.uniform(0.1, 0.35, n)[:, None] + 0.02 * rng.standard_normal((n, 3))
    noise = _NOISE * rng.standard_normal((n, *SAMPLE_SHAPE))
    return render(prompt.shape, centre, radius, obj, bg, noise), kind


def sample_scenes(n: int, seed: int, cond: str | None = None, *, tail_fraction: float = 0.05,
                  failure_fraction: float = 0.10) -> np.ndarray:
    """The data source: n flattened images of prompt ``cond``, shape (n, 768), float32 in [-1, 1].

    Called as ``source(n, seed, cond=prompt, **data.kwargs)``, once per entry of ``data.conditions``.
    """
    if cond is None:
        raise ValueError("the scenes data source needs a prompt: call it with cond='a red disc' (one of "
                         "data.conditions)")
    images, _ = draw_scenes(n, seed, cond, tail_fraction=tail_fraction, failure_fraction=failure_fraction)
    return images.reshape(n, -1).astype(np.float32)
