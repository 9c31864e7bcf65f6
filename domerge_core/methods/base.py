"""What a merge-method function receives and returns (see ``methods/__init__.py``)."""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import List, Optional, Sequence, Union

import torch

from ..algebra.linalg import blocks

Tensor = torch.Tensor


@dataclass
class TaskSet:
    """T task updates for a batch of N modules of equal shape, ready to merge.

    Stored stacked: ``up`` (N, m, R) and ``down`` (N, R, n), R = Σ r_i, task i owning columns /
    rows ``offsets[i]:offsets[i]+r_i``; ``ups[i] @ downs[i]`` (N, m, n) is task i's update with
    everything the door does before the method already applied: the format scale, the balanced
    form / orthogonalization, the decouple direction normalisation, and the user strength
    (``w_i``, or ``w_i/g`` for directions).
    """
    up: Tensor                        # (N, m, R)
    down: Tensor                      # (N, R, n)
    ranks: List[int]                  # T
    keys: List[str]                   # N canonical module keys
    inputs: Sequence[int]             # T positions of these tasks in the merge's input list
    tags: Sequence[str] = ()          # T stable names of the inputs (file name + occurrence), for seeds

    @property
    def offsets(self) -> List[int]:
        return [o for o, _ in blocks(self.ranks)]

    @property
    def ups(self) -> List[Tensor]:
        return [self.up[..., o:o + r] for o, r in zip(self.offsets, self.ranks)]

    @property
    def downs(self) -> List[Tensor]:
        return [self.down[..., o:o + r, :] for o, r in zip(self.offsets, self.ranks)]

    def dense(self, i: int) -> Tensor:
        """Task i's dense update (N, m, n) — only for the methods that need it."""
        o, r = self.offsets[i], self.ranks[i]
        return self.up[..., o:o + r] @ self.down[..., o:o + r, :]

    def dense_all(self) -> Tensor:
        """All tasks' dense updates (T, N, m, n)."""
        return torch.stack([self.dense(i) for i in range(len(self.ranks))], 0)


@dataclass
class MethodContext:
    seed: int
    device: torch.device
    dtype: torch.dtype


@dataclass
class LowRankUpdate:
    """The merged update is ``up @ down`` exactly (N, m, R), (N, R, n).

    ``S`` (optional, (N, R), descending): a method whose factors already are the update's exact SVD —
    ``up = U·diag(S)`` with orthonormal columns, ``down`` with orthonormal rows — says so by setting
    it; the door then truncates by slicing (`linalg.truncate_svd_form`) instead of a QR + core SVD.
    """
    up: Tensor
    down: Tensor
    S: Optional[Tensor] = None


@dataclass
class DenseUpdate:
    """The merged update as dense matrices (N, m, n)."""
    delta: Tensor


Update = Union[LowRankUpdate, DenseUpdate]


def stacked(tasks: TaskSet) -> LowRankUpdate:
    """``Σ_i ups[i] @ downs[i]`` as one factor pair: ``[up_1 … up_T] · [down_1; …; down_T]``
    (the stacked tensors themselves, no copy)."""
    return LowRankUpdate(tasks.up, tasks.down)


def module_seed(seed: int, key: str, tag: str) -> int:
    """A per-(module, input) seed from the merge seed, the module key and the input's tag (its file
    name, plus ``#n`` for the n-th repeat of a name): the draws of one module do not depend on
    batching, module order, device, or which other inputs are merged (so strength 0 removes an
    input exactly, also for DARE)."""
    h = zlib.crc32(key.encode("utf-8"))
    t = zlib.crc32(str(tag).encode("utf-8"))
    return (int(seed) * 0x9E3779B1 + h * 1000003 + t * 7919) % (2 ** 63 - 1)


def magnitude_trim(x: Tensor, density: float) -> Tensor:
    """Keep, per module (leading dims), the ``k = max(1, int(density·m·n))`` entries of largest
    |value| (all entries tied with the k-th largest are kept); zero the rest."""
    if density >= 1.0:
        return x
    flat = x.reshape(*x.shape[:-2], -1)
    numel = flat.shape[-1]
    k = max(1, int(density * numel))
    thr = flat.abs().kthvalue(numel - k + 1, dim=-1, keepdim=True).values
    return (flat * (flat.abs() >= thr)).reshape(x.shape)


def elect_sign(x: Tensor, method: str) -> Tensor:
    """TIES sign election over tasks (dim 0): ``total`` = sign of the sum, ``frequency`` = sign of
    the count of signs; ties go to +1 (as PEFT)."""
    if method == "total":
        s = x.sum(0)
    elif method == "frequency":
        s = x.sign().sum(0)
    else:
        raise ValueError(f"unknown sign_method {method!r} (use total or frequency)")
    return torch.where(s >= 0, 1.0, -1.0).to(x.dtype)


def disjoint_mean(x: Tensor, sign: Tensor) -> Tensor:
    """Mean over the tasks whose entry agrees with the elected sign (zeros do not count)."""
    agree = (x.sign() == sign.unsqueeze(0)).to(x.dtype)
    return (x * agree).sum(0) / agree.sum(0).clamp_min(1.0)


def dare_masks(tasks: TaskSet, ctx: MethodContext, drop_rate: float, i: int) -> Tensor:
    """Keep-masks (N, m, n) for task i, drawn on the CPU from per-module seeds (same on every device)."""
    m = tasks.up.shape[-2]
    n = tasks.down.shape[-1]
    out = []
    for key in tasks.keys:
        tag = tasks.tags[i] if tasks.tags else str(tasks.inputs[i])
        g = torch.Generator().manual_seed(module_seed(ctx.seed, key, tag))
        out.append(torch.rand(m, n, generator=g) >= drop_rate)
    return torch.stack(out, 0).to(ctx.device)


def dare_drop(tasks: TaskSet, ctx: MethodContext, drop_rate: float, rescale: bool) -> Tensor:
    """DARE: drop each entry of each task with probability ``drop_rate``; rescale the survivors by
    ``1/(1-drop_rate)`` if ``rescale``. Returns (T, N, m, n)."""
    outs = []
    for i in range(len(tasks.ranks)):
        x = tasks.dense(i)
        if drop_rate > 0:
            x = x * dare_masks(tasks, ctx, drop_rate, i).to(x.dtype)
            if rescale:
                x = x / (1.0 - drop_rate)
        outs.append(x)
    return torch.stack(outs, 0)
