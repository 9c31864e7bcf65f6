"""Real, packaged data for the quality benchmark: scikit-learn's bundled ``load_digits``.

1797 handwritten digits, 8×8 grey levels 0..16, shipped inside the scikit-learn wheel
(``sklearn/datasets/data/digits.csv.gz``), so nothing is downloaded at run time.

One backbone is pre-trained on the upright digits 0–4. Each *task* is a real domain or label
shift of the same images, so every task needs its own adaptation and the tasks interfere when
merged:

=========  ===================================================  =======
task       input domain                                         classes
=========  ===================================================  =======
upper      upright, only digits 5–9 (label shift)               5
rot90      rotated 90°                                          10
invert     intensities inverted (16 − x)                        10
mirror     left-right mirrored                                  10
noisy      3×3 blur + Gaussian noise (σ = 3 grey levels)        10
shuffled   2×2 patches permuted by a fixed (per-seed) order     10
parity     rotated 180°, label = digit mod 2 (label grouping)   2
mod3       transposed, label = digit mod 3 (label grouping)     3
=========  ===================================================  =======

Splits (per seed, stratified by digit): train 60 %, val 15 %, test 25 %. The backbone and the
LoRAs see only train; λ and every swept option are chosen on val; the table is scored on test.
Noise is drawn once per image (fixed by the seed), so val/test are the same on every rerun.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Tuple

import numpy as np
import torch

TASKS: Tuple[str, ...] = ("upper", "rot90", "invert", "mirror", "noisy", "shuffled", "parity", "mod3")
NUM_CLASSES: Dict[str, int] = {"pretrain": 5, "upper": 5, "rot90": 10, "invert": 10, "mirror": 10,
                               "noisy": 10, "shuffled": 10, "parity": 2, "mod3": 3}
SPLITS = ("train", "val", "test")


def load_digits_array() -> Tuple[np.ndarray, np.ndarray]:
    """(images N×8×8 float32 in [0, 1], labels N int64) from the copy bundled with scikit-learn."""
    from sklearn.datasets import load_digits
    d = load_digits()
    return (d.images.astype(np.float32) / 16.0), d.target.astype(np.int64)


def split_indices(labels: np.ndarray, seed: int, fractions=(0.6, 0.15, 0.25)) -> Dict[str, np.ndarray]:
    """Stratified train/val/test index split."""
    rng = np.random.default_rng(10_000 + seed)
    out = {s: [] for s in SPLITS}
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_tr = int(round(fractions[0] * len(idx)))
        n_va = int(round(fractions[1] * len(idx)))
        out["train"].append(idx[:n_tr])
        out["val"].append(idx[n_tr:n_tr + n_va])
        out["test"].append(idx[n_tr + n_va:])
    return {s: np.sort(np.concatenate(v)) for s, v in out.items()}


def _blur(x: np.ndarray) -> np.ndarray:
    k = np.array([1.0, 2.0, 1.0], dtype=np.float32) / 4.0
    p = np.pad(x, ((0, 0), (1, 1), (1, 1)), mode="constant")
    h = k[0] * p[:, :, :-2] + k[1] * p[:, :, 1:-1] + k[2] * p[:, :, 2:]
    return k[0] * h[:, :-2, :] + k[1] * h[:, 1:-1, :] + k[2] * h[:, 2:, :]


def _shuffle_patches(x: np.ndarray, perm: np.ndarray) -> np.ndarray:
    n = x.shape[0]
    patches = x.reshape(n, 4, 2, 4, 2).transpose(0, 1, 3, 2, 4).reshape(n, 16, 2, 2)
    patches = patches[:, perm]
    return patches.reshape(n, 4, 4, 2, 2).transpose(0, 1, 3, 2, 4).reshape(n, 8, 8)


def transform(task: str, images: np.ndarray, labels: np.ndarray, seed: int
              ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images, labels, keep-mask) of one task over a batch of upright digits."""
    keep = np.ones(len(labels), dtype=bool)
    y = labels.copy()
    x = images
    if task == "pretrain":
        keep = labels <= 4
    elif task == "upper":
        keep = labels >= 5
        y = labels - 5
    elif task == "rot90":
        x = np.rot90(images, 1, axes=(1, 2))
    elif task == "invert":
        x = 1.0 - images
    elif task == "mirror":
        x = images[:, :, ::-1]
    elif task == "noisy":
        rng = np.random.default_rng(20_000 + seed)
        x = _blur(images) + rng.normal(0.0, 3.0 / 16.0, images.shape).astype(np.float32)
    elif task == "shuffled":
        perm = np.random.default_rng(30_000 + seed).permutation(16)
        x = _shuffle_patches(images, perm)
    elif task == "parity":
        x = np.rot90(images, 2, axes=(1, 2))
        y = labels % 2
    elif task == "mod3":
        x = images.transpose(0, 2, 1)
        y = labels % 3
    else:
        raise ValueError(f"unknown task {task!r}")
    return np.ascontiguousarray(x, dtype=np.float32), y, keep


@dataclass
class TaskData:
    x: torch.Tensor      # N×8×8 float32
    y: torch.Tensor      # N int64


def build(seed: int) -> Dict[str, Dict[str, TaskData]]:
    """{task: {split: TaskData}} for "pretrain" and every task in TASKS."""
    images, labels = load_digits_array()
    splits = split_indices(labels, seed)
    out: Dict[str, Dict[str, TaskData]] = {}
    for task in ("pretrain",) + TASKS:
        # transform the full set once so per-image noise does not depend on the split
        x, y, keep = transform(task, images, labels, seed)
        out[task] = {}
        for s, idx in splits.items():
            idx = idx[keep[idx]]
            out[task][s] = TaskData(torch.from_numpy(x[idx].copy()), torch.from_numpy(y[idx].copy()))
    return out


def task_list() -> List[str]:
    return list(TASKS)
