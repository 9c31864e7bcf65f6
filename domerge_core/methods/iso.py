"""Iso-C and Iso-CTS (Marczak et al., "No task left behind: isotropic model merging with common and
task-specific subspaces", ICML 2025).

Iso-C (Alg. 1, eq. 6): the task-arithmetic sum ``ΣΔW_i = U Σ Vᵀ`` with its spectrum flattened to
the mean singular value, ``σ̄ · U Vᵀ``. Iso-CTS (Alg. 2): keep the top ``k`` directions of the sum
(the common subspace), fill the remaining ``D − k`` with each task's top directions of its update
projected off the common subspace, ``(I − U_k U_kᵀ) ΔW_i``, whiten the combined bases (orthogonal
polar factor) and give every direction the mean singular value.

Span dimension: ``D = min(m, n, Σ r_i)`` — the updates' spans, as in Core Space (the official code
on full fine-tunes uses min(m, n); on LoRAs that adds directions outside every LoRA's span, with
arbitrary pairing, and a full-rank m×n result). Singular values below 1000·eps of the largest are
treated as zero (not counted in the mean, no direction). Exact low rank ≤ D.

Truncating a flat spectrum (``rank``/``energy`` below the merge's rank) has no unique optimum: the
door keeps, for Iso-C, the k strongest directions of the summed LoRAs, and for Iso-CTS the
whitened common directions first, then the task-specific ones.
"""
from __future__ import annotations

import torch

from ..algebra.linalg import _svd, exact_svd, mT, polar, rank_mask, sort_svd_form
from .spaces import span_cores
from .base import LowRankUpdate, MethodContext, TaskSet
from .common import LAM
from .registry import MethodSpec, Param, register


def isotropic(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor) -> LowRankUpdate:
    """``σ̄ · U Vᵀ`` over the non-zero singular values (σ̄ their mean)."""
    live = rank_mask(S).to(S.dtype)
    sbar = (S * live).sum(-1, keepdim=True) / live.sum(-1, keepdim=True).clamp_min(1)
    S_iso = sbar * live                              # descending: the zeros are the trailing values
    return LowRankUpdate(U * S_iso.unsqueeze(-2), Vh, S_iso)


def iso_c(tasks: TaskSet, params: dict, ctx: MethodContext) -> LowRankUpdate:
    """Iso-C, eq. 6: ``σ̄ · U Vᵀ`` of the task-arithmetic sum."""
    return isotropic(*exact_svd(tasks.up, tasks.down))


def cts_sizes(D: int, T: int, common_fraction: float):
    """(k common, s per task) with k + T·s = D, as Alg. 2 (task share divisible by T)."""
    k = int(D * common_fraction)
    s = int(round((D - k) / T))
    if s * T > D:
        s = D // T
    return D - s * T, s


def iso_cts(tasks: TaskSet, params: dict, ctx: MethodContext) -> LowRankUpdate:
    """Iso-CTS, Alg. 2: common top-k of the sum + each task's top-s of its projection off it,
    both bases whitened, isotropic spectrum — in the span coordinates of `spaces.span_cores`
    (``ΔW_i = Q_B K_i Q_Aᵀ``; projections and polar factors commute with Q_B, Q_A)."""
    Qb, Qa, blocks = span_cores(tasks)
    U, S, Vh = _svd(sum(C @ mT(D) for C, D in blocks))
    T = len(tasks.ranks)
    k, s = cts_sizes(S.shape[-1], T, params["common_fraction"])
    Uc = U[..., :k]
    us, ss, vs = [], [], []
    for C, D in blocks:
        Ut, St, Vt = exact_svd(C - Uc @ (mT(Uc) @ C), mT(D))   # (I − U_c U_cᵀ) K_i, rank ≤ r_i
        j = min(s, St.shape[-1])
        live = rank_mask(St)[..., :j].to(St.dtype) if j else St[..., :0]
        pad = s - j
        us.append(torch.cat([Ut[..., :j] * live.unsqueeze(-2), Ut.new_zeros(Ut.shape[:-1] + (pad,))], -1))
        ss.append(torch.cat([St[..., :j] * live, St.new_zeros(St.shape[:-1] + (pad,))], -1))
        vs.append(torch.cat([Vt[..., :j, :] * live.unsqueeze(-1), Vt.new_zeros(Vt.shape[:-2] + (pad, Vt.shape[-1]))], -2))
    # common block first: the polar factor is permutation-equivariant, and a truncated (flat-spectrum)
    # merge then keeps the whitened common directions before the task-specific ones
    Uall = torch.cat([Uc] + us, -1)
    Sall = torch.cat([S[..., :k]] + ss, -1)
    Vall = torch.cat([Vh[..., :k, :]] + vs, -2)
    live = (Sall > 0) & rank_mask(S)[..., :1]        # zero rows padded above; all-zero module stays zero
    sbar = (Sall * live).sum(-1, keepdim=True) / live.sum(-1, keepdim=True).clamp_min(1)
    return LowRankUpdate(*sort_svd_form(Qb @ polar(Uall), sbar * live, mT(polar(mT(Vall))) @ mT(Qa)))


COMMON = Param("common_fraction", "float", 0.8, min=0.0, max=1.0, step=0.05, label="Common fraction",
               help="Iso-CTS: fraction of the span (min(m, n, Σ ranks)) given to the top directions of the "
                    "summed LoRAs; the rest is split equally among the LoRAs' own directions. 1.0 is Iso-C. "
                    "0.8: the paper's default.")
register(MethodSpec(
    name="iso_c", label="Iso-C",
    description="Isotropic merge: the summed LoRAs' singular vectors, every one with the mean singular "
                "value (flat spectrum). Exact low rank ≤ Σ ranks.",
    params=(LAM,), fn=iso_c, lowrank=True))
register(MethodSpec(
    name="iso_cts", label="Iso-CTS",
    description="Isotropic merge in common and task-specific subspaces: the sum's top directions plus each "
                "LoRA's own leftover directions, whitened, flat spectrum. Exact low rank ≤ Σ ranks.",
    params=(LAM, COMMON), fn=iso_cts, lowrank=True))
