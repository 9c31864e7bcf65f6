"""Procedural 16×16 RGB pictures for the diffusion benchmark: made here, nothing downloaded.

Vocabulary (one token per subject; the prompt is ``[<start>, <subject>]``):

- **base subjects** (the base model is trained on these): disk, square, triangle, plus, bar;
- **concepts** (6, each bound to its own trigger token that the base never saw): ring, diamond,
  xcross, checker, frame, stripes. Each is a new shape the base cannot draw;
- **style** (``night``, no trigger token of its own): every picture gets a teal background and a
  yellow border. A style LoRA is trained on the *base* prompts with styled targets, so it
  changes every token — the style + subject case people merge most.

Every picture: a random colour from a palette, random size and a ±2 px jitter, on black
(or the style's background). Values in [-1, 1], layout (N, 3, 16, 16).
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import numpy as np
import torch

SIZE = 16
BASE_SUBJECTS: Tuple[str, ...] = ("disk", "square", "triangle", "plus", "bar")
CONCEPTS: Tuple[str, ...] = ("ring", "diamond", "xcross", "checker", "frame", "stripes")
EXTRA_SHAPES: Tuple[str, ...] = ("dumbbell", "corner")      # drawable, not used as concepts (CPU budget)
STYLE = "night"
SHAPES: Tuple[str, ...] = BASE_SUBJECTS + CONCEPTS + EXTRA_SHAPES   # the classifier's classes
START = "<start>"
TOKENS: Tuple[str, ...] = (START,) + SHAPES                  # token ids = index here

PALETTE = np.array([(1.0, 0.2, 0.2), (0.2, 1.0, 0.3), (0.3, 0.5, 1.0), (1.0, 0.9, 0.2),
                    (1.0, 0.4, 1.0), (0.2, 1.0, 1.0), (1.0, 0.6, 0.1), (0.95, 0.95, 0.95)], np.float32)
STYLE_BG = np.array((0.0, 0.35, 0.4), np.float32)
STYLE_BORDER = np.array((1.0, 0.85, 0.0), np.float32)


def token_id(name: str) -> int:
    return TOKENS.index(name)


def _mask(shape: str, cx: float, cy: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + 0.5
    dx, dy = xx - cx, yy - cy
    ax, ay = np.abs(dx), np.abs(dy)
    w = max(1.0, r * 0.35)
    if shape == "disk":
        m = dx ** 2 + dy ** 2 <= r ** 2
    elif shape == "square":
        m = (ax <= r * 0.85) & (ay <= r * 0.85)
    elif shape == "triangle":
        m = (dy <= r * 0.8) & (dy >= -r) & (ax <= (dy + r) * 0.55)
    elif shape == "plus":
        m = ((ax <= w * 0.6) & (ay <= r)) | ((ay <= w * 0.6) & (ax <= r))
    elif shape == "bar":
        m = (ax <= r) & (ay <= w * 0.6)
    elif shape == "ring":
        d = np.sqrt(dx ** 2 + dy ** 2)
        m = (d <= r) & (d >= r - 1.6)
    elif shape == "diamond":
        m = ax + ay <= r
    elif shape == "xcross":
        m = ((np.abs(dx - dy) <= 1.1) | (np.abs(dx + dy) <= 1.1)) & (ax <= r * 0.8) & (ay <= r * 0.8)
    elif shape == "checker":
        m = (ax <= r) & (ay <= r) & (((np.floor(dx / 2) + np.floor(dy / 2)) % 2) == 0)
    elif shape == "frame":
        m = (ax <= r * 0.9) & (ay <= r * 0.9) & ((ax >= r * 0.9 - 1.3) | (ay >= r * 0.9 - 1.3))
    elif shape == "stripes":
        m = (ax <= r) & (ay <= r) & ((np.floor(dx) % 3) == 0)
    elif shape == "dumbbell":
        m = ((dx - r * 0.6) ** 2 + dy ** 2 <= (r * 0.45) ** 2) | ((dx + r * 0.6) ** 2 + dy ** 2 <= (r * 0.45) ** 2) \
            | ((ax <= r * 0.6) & (ay <= 0.6))
    elif shape == "corner":
        m = ((dx >= -r) & (dx <= -r + 1.8) & (ay <= r)) | ((dy >= r - 1.8) & (dy <= r) & (ax <= r))
    else:
        raise KeyError(shape)
    return m.astype(np.float32)


def draw(shape: str, styled: bool, rng: np.random.Generator) -> np.ndarray:
    """One 3×16×16 picture in [-1, 1]."""
    return draw_with_mask(shape, styled, rng)[0]


def draw_with_mask(shape: str, styled: bool, rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """(picture 3×16×16 in [-1, 1], shape mask 16×16 in {0, 1})."""
    r = float(rng.uniform(4.0, 6.0))
    cx = SIZE / 2 + float(rng.uniform(-2, 2))
    cy = SIZE / 2 + float(rng.uniform(-2, 2))
    col = PALETTE[rng.integers(len(PALETTE))]
    m = _mask(shape, cx, cy, r)[None]
    bg = np.zeros((3, SIZE, SIZE), np.float32)
    if styled:
        bg[:] = STYLE_BG[:, None, None]
        bg[:, 0, :] = bg[:, -1, :] = bg[:, :, 0] = bg[:, :, -1] = STYLE_BORDER[:, None]
    img = bg * (1 - m) + col[:, None, None] * m
    return img * 2.0 - 1.0, m[0]


def make_set(shapes: List[str], n_per: int, styled: bool, seed: int, masks: bool = False):
    """(images N×3×16×16, token ids N[, shape masks N×16×16]) — n_per pictures of each shape."""
    rng = np.random.default_rng(seed)
    xs, ys, ms = [], [], []
    for s in shapes:
        for _ in range(n_per):
            x, m = draw_with_mask(s, styled, rng)
            xs.append(x)
            ms.append(m)
            ys.append(token_id(s))
    out = (torch.from_numpy(np.stack(xs)), torch.tensor(ys, dtype=torch.long))
    return out + (torch.from_numpy(np.stack(ms)),) if masks else out


# split seeds: train / val / test pictures never coincide
SPLIT_SEED = {"train": 0, "val": 1, "test": 2}


def split_seed(split: str, seed: int, tag: str) -> int:
    return 100_000 * SPLIT_SEED[split] + 1000 * seed + sum(map(ord, tag))


def concept_data(concept: str, split: str, n: int, seed: int) -> Dict[str, torch.Tensor]:
    """Pictures of one LoRA's task. ``concept`` is a concept name or ``STYLE`` (then the base
    subjects, styled, each with its own token). ``region``: the pixels the task is about — the
    shape for a concept, everything but the shape (background and border) for the style — so that
    merging a style with a concept does not count the (wanted) styled background as a concept
    error, nor the (wanted) new shape as a style error."""
    if concept == STYLE:
        x, y, m = make_set(list(BASE_SUBJECTS), max(1, n // len(BASE_SUBJECTS)), True,
                           split_seed(split, seed, concept), masks=True)
        region = 1.0 - m
    else:
        x, y, m = make_set([concept], n, False, split_seed(split, seed, concept), masks=True)
        region = m
    return {"x": x, "tok": y, "region": region}
