"""CART (Choi et al., "Revisiting weight averaging for model merging", 2024, eq. 5): the mean task
update plus the rank-k truncations of the centred task updates,
``ΔW = τ̄ + c · Σ_i SVD_k(τ_i − τ̄)``, ``τ̄ = (1/T) Σ τ_i``.

``τ_i − τ̄ = B · diag(e_i − 1/T) · A`` on the stacked factors, so each truncation is one R×R core
SVD (B = Q_B R_B, Aᵀ = Q_A R_A computed once). ``k = ⌈rank_fraction · min(m, n, Σ r_i)⌉`` (the
Core Space code's choice of span). Exact low rank ≤ Σ r_i (all terms live in the stacked factors' spans).
"""
from __future__ import annotations

import math

import torch

from ..algebra.linalg import _qr, _svd, mT, svd_form
from .base import LowRankUpdate, MethodContext, TaskSet
from .common import LAM
from .registry import MethodSpec, Param, register


def cart(tasks: TaskSet, params: dict, ctx: MethodContext) -> LowRankUpdate:
    """CART eq. 5, every term in the Q_B, Q_A coordinates of the stacked factors' spans:
    ``Q_B · (R_B R_Aᵀ/T + c Σ_i SVD_k(R_B diag(e_i − 1/T) R_Aᵀ)) · Q_Aᵀ``."""
    B, A = tasks.up, tasks.down
    T, R = len(tasks.ranks), B.shape[-1]
    m, n = B.shape[-2], A.shape[-1]
    k = max(1, math.ceil(params["rank_fraction"] * min(m, n, R)))
    Qb, Rb = _qr(B)                                          # B = Q_B R_B
    Qa, Ra = _qr(mT(A))                                      # A = R_Aᵀ Q_Aᵀ
    core = (Rb @ mT(Ra)) / T                                 # τ̄ in the Q_B, Q_A coordinates
    for o, r in zip(tasks.offsets, tasks.ranks):
        c = torch.full((R,), -1.0 / T, dtype=B.dtype, device=B.device)
        c[o:o + r] += 1.0
        u, s, vh = _svd((Rb * c) @ mT(Ra))                   # τ_i − τ̄ = Q_B (R_B diag(c_i) R_Aᵀ) Q_Aᵀ
        kk = min(k, s.shape[-1])
        core = core + (u[..., :kk] * (params["cart_scale"] * s[..., :kk]).unsqueeze(-2)) @ vh[..., :kk, :]
    return LowRankUpdate(*svd_form(Qb, core, mT(Qa)))


register(MethodSpec(
    name="cart", label="CART",
    description="Centred arithmetic with rank reduction: the average of the LoRAs plus low-rank "
                "truncations of each LoRA's difference from that average. Exact low rank.",
    params=(LAM,
            Param("rank_fraction", "float", 0.16, min=0.01, max=1.0, step=0.01, label="Rank fraction",
                  help="Rank kept of each LoRA's difference from the average, as a fraction of "
                       "min(m, n, Σ ranks). 1.0 keeps all (the merge is then the plain average)."),
            Param("cart_scale", "float", 1.0, min=0.0, max=5.0, step=0.05, label="Centred scale",
                  help="Scale of the summed low-rank centred updates added to the average (CART's λ; "
                       "the overall λ still multiplies the result).")),
    fn=cart, lowrank=True))
