"""Step 2–3 of DO-Merging: split each task update into column magnitudes and unit-column
directions, merge the two parts separately, recombine (method.md §2–§3).

All on factors: ``W_i = B_i A_i`` has column norms ``α_i`` computed from the r×r Gram ``B_iᵀB_i``;
the direction ``W̃_i = B_i (A_i diag(1/α_i))`` is a column scaling of A_i, so it stays rank r_i.

Strength semantics [ours, method.md §3], with ``g = max_i |w_i|``:
- the direction merge sees ``(w_i/g)·W̃_i``,
- magnitude rules (``magnitude`` option):
  ``weighted_mean`` (default): ``α* = g·Σ|w_i|α_i / Σ|w_i|`` — the plain mean at equal strengths,
  continuous in every strength and exact for one LoRA;
  ``mean``: ``α* = (1/T)·Σ|w_i|α_i`` — the mean of the strength-scaled magnitudes;
  ``max``: ``α* = max_i |w_i|α_i``.
- recombination (``recombine`` option): ``v1``: ``ΔW* = λ·D*·diag(α*)``;
  ``v2`` (norm-preserving): ``ΔW* = λ·D*·diag(α*/‖D*[:,k]‖)``, so each merged column has the
  merged magnitude (λ = 1 gives the spec's v2 exactly).
With either, one LoRA at strength w gives ``λ·w·ΔW``, and scaling every strength by c scales the
result by c.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from .linalg import blocks, col_norms, mT, safe_inverse

Tensor = torch.Tensor

MAGNITUDE_RULES = ("weighted_mean", "mean", "max")
RECOMBINE_RULES = ("v1", "v2")
EPS = 1e-12


def split_blocks(B: Tensor, A: Tensor, ranks: Sequence[int]) -> Tuple[List[Tensor], List[Tensor]]:
    return [B[..., o:o + r] for o, r in blocks(ranks)], [A[..., o:o + r, :] for o, r in blocks(ranks)]


def magnitudes(Bs: Sequence[Tensor], As: Sequence[Tensor], GB: Optional[Tensor] = None) -> Tensor:
    """Column norms of every task update, (…, T, n). ``GB``: the stacked ``BᵀB`` (…, R, R) if known
    (its diagonal blocks are the per-task Grams; saves the m-dimensional pass)."""
    out = []
    for (o, r), b, a in zip(blocks([a.shape[-2] for a in As]), Bs, As):
        g = GB[..., o:o + r, o:o + r] if GB is not None else mT(b) @ b
        out.append(((g @ a) * a).sum(-2).clamp_min(0).sqrt())
    return torch.stack(out, -2)


def direction_down(A: Tensor, alpha: Tensor, ranks: Sequence[int], w: Optional[Tensor] = None) -> Tensor:
    """Stacked ``[A_1 diag(1/α_1); …]`` in one pass (a new tensor); with ``w`` (T,), the task
    coefficients are folded into the same pass: ``[w_1 A_1 diag(1/α_1); …]``."""
    inv = _inverse_magnitude(alpha)
    if w is not None:
        inv = inv * w.to(inv.dtype).unsqueeze(-1)
    out = torch.empty_like(A)
    for t, (o, r) in enumerate(blocks(ranks)):
        torch.mul(A[..., o:o + r, :], inv[..., t, :].unsqueeze(-2), out=out[..., o:o + r, :])
    return out


def _inverse_magnitude(x: Tensor) -> Tensor:
    """1/x, and 0 where x is (relatively) zero: zero columns get a zero direction."""
    return safe_inverse(x, EPS)


def merge_magnitudes(alpha: Tensor, w: Tensor, rule: str = "weighted_mean") -> Tensor:
    """α* (…, n) from per-task α (…, T, n) and strengths w (T,) or per module (…, T)."""
    aw = w.abs().to(alpha.dtype)
    if rule == "weighted_mean":
        g = aw.amax(-1, keepdim=True)
        return g * (aw.unsqueeze(-1) * alpha).sum(-2) / aw.sum(-1, keepdim=True)
    if rule == "mean":
        return (aw.unsqueeze(-1) * alpha).mean(-2)
    if rule == "max":
        return (aw.unsqueeze(-1) * alpha).amax(-2)
    raise ValueError(f"unknown magnitude rule {rule!r} (use one of {', '.join(MAGNITUDE_RULES)})")


def direction_weights(w: Tensor) -> Tensor:
    """``w_i / g`` with ``g = max|w_i|`` (the direction merge's per-task coefficients), over the
    last dimension of w (T,) or (…, T)."""
    g = w.abs().amax(-1, keepdim=True)
    return torch.where(g > 0, w / torch.where(g > 0, g, torch.ones_like(g)), w)


def recombine_scale(B: Tensor, A: Tensor, alpha_star: Tensor, rule: str, lam: float,
                    GB: Optional[Tensor] = None) -> Tensor:
    """The column scaling (…, 1, n) of the merged direction ``B @ A`` that recombination applies:
    v1 ``λ·α*``; v2 ``λ·α*/‖(BA)[:, k]‖`` (the column norms from ``GB = BᵀB`` when given)."""
    if rule == "v1":
        return (lam * alpha_star).unsqueeze(-2)
    if rule == "v2":
        norms = col_norms(B, A) if GB is None else ((GB @ A) * A).sum(-2).clamp_min(0).sqrt()
        return (lam * alpha_star * _inverse_magnitude(norms)).unsqueeze(-2)
    raise ValueError(f"unknown recombine rule {rule!r} (use one of {', '.join(RECOMBINE_RULES)})")


def recombine_lowrank(B: Tensor, A: Tensor, alpha_star: Tensor, rule: str, lam: float,
                      inplace: bool = False, GB: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Low-rank recombination: a column scaling of the merged direction's down factor
    (in place on A when ``inplace``; ``GB``: ``BᵀB`` if known, for v2)."""
    if rule in RECOMBINE_RULES:
        s = recombine_scale(B, A, alpha_star, rule, lam, GB)
    else:
        s = None
    if s is not None:
        return B, (A.mul_(s) if inplace else A * s)
    raise ValueError(f"unknown recombine rule {rule!r} (use one of {', '.join(RECOMBINE_RULES)})")


def recombine_dense(D: Tensor, alpha_star: Tensor, rule: str, lam: float) -> Tensor:
    """Dense recombination of a merged direction D (…, m, n)."""
    if rule == "v1":
        return D * (lam * alpha_star).unsqueeze(-2)
    if rule == "v2":
        d = D.norm(dim=-2)
        return D * (lam * alpha_star * _inverse_magnitude(d)).unsqueeze(-2)
    raise ValueError(f"unknown recombine rule {rule!r} (use one of {', '.join(RECOMBINE_RULES)})")
