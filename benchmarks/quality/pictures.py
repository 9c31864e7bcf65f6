"""Picture grids of the diffusion benchmark: what a user would look at.

One grid per case (T = 2, 3, all; seed 0): rows = base, each LoRA alone, stacked (ta λ 1),
``ta`` at its tuned λ, ``do`` at its tuned λ, and the default (``do`` drop-in: strengths 1, every
option at its default); columns = each member's token (the style: two base subjects), three
fixed sampler seeds each. Written to ``docs/quality_diffusion_<case>.png``.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

import diffusion_model as M
import shapes as S

SAMPLES_PER_TOKEN = 3
STYLE_SUBJECTS = ("disk", "triangle")


def columns(tasks: Sequence[str]) -> List[Tuple[str, int]]:
    cols: List[Tuple[str, int]] = []
    for t in tasks:
        names = STYLE_SUBJECTS if t == S.STYLE else (t,)
        for n in names:
            cols += [(n, k) for k in range(SAMPLES_PER_TOKEN)]
    return cols


def render(bench, rows: Sequence[Tuple[str, Optional[object]]], tasks: Sequence[str]) -> Tuple[np.ndarray, List[Tuple[str, int]]]:
    cols = columns(tasks)
    tok = torch.tensor([S.token_id(n) for n, _ in cols])
    out = []
    for _, lora in rows:
        bench.fuser.fuse(lora)
        try:
            imgs = M.sample(bench.unet, bench.table, tok, seed=90_000, steps=10)
        finally:
            bench.fuser.unfuse()
        out.append(((imgs + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).numpy())
    return np.stack(out), cols


def save_grid(path: str, title: str, labels: Sequence[str], imgs: np.ndarray, cols: Sequence[Tuple[str, int]]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    nr, nc = imgs.shape[:2]
    pad = 2
    cell = S.SIZE * 3
    canvas = np.ones((nr * (cell + pad), nc * (cell + pad), 3), np.float32)
    for i in range(nr):
        for j in range(nc):
            im = np.kron(imgs[i, j], np.ones((3, 3, 1), np.float32))
            canvas[i * (cell + pad):i * (cell + pad) + cell, j * (cell + pad):j * (cell + pad) + cell] = im
    dpi = 100
    w = canvas.shape[1] / dpi + 2.4
    h = canvas.shape[0] / dpi + 0.9
    fig = plt.figure(figsize=(w, h), dpi=dpi)
    ax = fig.add_axes([2.3 / w, 0.1 / h, canvas.shape[1] / dpi / w, canvas.shape[0] / dpi / h])
    ax.imshow(canvas, interpolation="nearest")
    ax.set_xticks([j * (cell + pad) + cell / 2 for j in range(0, nc, SAMPLES_PER_TOKEN)])
    ax.set_xticklabels([cols[j][0] for j in range(0, nc, SAMPLES_PER_TOKEN)], fontsize=8)
    ax.xaxis.tick_top()
    ax.set_yticks([i * (cell + pad) + cell / 2 for i in range(nr)])
    ax.set_yticklabels(labels, fontsize=8)
    ax.tick_params(length=0)
    for s in ax.spines.values():
        s.set_visible(False)
    fig.suptitle(title, fontsize=9, y=1 - 0.05 / h, va="top")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
