"""TSV-M (Gargiulo et al., "Task singular vectors: reducing task interference in model merging",
CVPR 2025, Alg. 1 / eq. 6–8).

Each task's SVD ``ΔW_i = U_i Σ_i V_iᵀ`` keeps its top ``k = min(r_i, ⌊min(m, n)/T⌋)`` singular
triplets; the concatenated singular vectors are whitened (orthogonal polar factor, eq. 8:
``Û = P_U Q_Uᵀ`` of ``[U_1 … U_T] = P_U S Q_Uᵀ``, likewise V̂) and
``ΔW = Û · diag(Σ_1 … Σ_T) · V̂ᵀ``. Exact low rank Σ k ≤ Σ r_i: per-task r×r core SVDs and thin
QRs of the m×Σk and n×Σk concatenations, never m×n.

Core-TSV (Core Space) is the same merge: the polar factor commutes with the orthonormal change of
basis (``polar(U_B Y) = U_B polar(Y)``). With LoRAs of unequal rank the official code keeps
⌊R/T⌋ triplets of every task (zero-padded, i.e. arbitrary, directions for the smaller ones); we
keep each task's own non-zero ones.
"""
from __future__ import annotations

import torch

from ..algebra.linalg import exact_svd, mT, polar, rank_mask, sort_svd_form
from .spaces import span_cores
from .base import LowRankUpdate, MethodContext, TaskSet
from .common import LAM
from .registry import MethodSpec, register


def tsv(tasks: TaskSet, params: dict, ctx: MethodContext) -> LowRankUpdate:
    """TSV-M, eq. 8: ``polar([U_1…U_T]) · diag(Σ) · polar([V_1…V_T])ᵀ``, in the span coordinates of
    `spaces.span_cores` (``U_i = Q_B u_i`` and ``polar(Q_B Y) = Q_B polar(Y)``)."""
    m, n = tasks.up.shape[-2], tasks.down.shape[-1]
    k_max = max(1, min(m, n) // len(tasks.ranks))
    Qb, Qa, blocks = span_cores(tasks)
    us, ss, vs = [], [], []
    for (C, D), r in zip(blocks, tasks.ranks):
        u, s, vh = exact_svd(C, mT(D))
        k = min(k_max, r, s.shape[-1])
        live = rank_mask(s[..., :k]).to(s.dtype)           # null directions: zero weight, zero vector
        us.append(u[..., :k] * live.unsqueeze(-2))
        ss.append(s[..., :k] * live)
        vs.append(vh[..., :k, :] * live.unsqueeze(-1))
    Yu, S, Yv = torch.cat(us, -1), torch.cat(ss, -1), torch.cat(vs, -2)
    return LowRankUpdate(*sort_svd_form(Qb @ polar(Yu), S, mT(polar(mT(Yv))) @ mT(Qa)))


register(MethodSpec(
    name="tsv", label="TSV-M",
    description="Task Singular Vectors merge: each LoRA's singular vectors, whitened together so the "
                "tasks' directions stop interfering, with their own singular values. Exact low rank.",
    params=(LAM,), fn=tsv, lowrank=True))
