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


def pair_products(GB: Tensor, A: Tensor, ranks: Sequence[int]) -> Tensor:
    """``Q`` (…, T, T, n) with ``Q[s, t, k] = A_s[:, k]ᵀ GB_st A_t[:, k]``: for factors with
    ``BᵀB = GB`` the inner products of column k of the task updates ``B_sA_s`` and ``B_tA_t``.
    ``Q[t, t]`` is ``α_t²`` (`magnitudes`), and the column norms of any merge of the tasks with
    per-column coefficients follow without another pass over the n columns (`combined_col_norms`).

    One product per task t of the rows ``s ≤ t`` of GB's column block t with ``A_t``: T(T+1)/2
    r×r products per column, where `magnitudes` plus a v2 recombination ``(GB @ D) · D`` take
    T r² + R² (R = Σr): half the work, and none of it depends on the strengths (cached)."""
    T, n = len(ranks), A.shape[-1]
    Q = A.new_empty(A.shape[:-2] + (T, T, n))
    offs = list(blocks(ranks))
    for t, (ot, rt) in enumerate(offs):
        Z = GB[..., :ot + rt, ot:ot + rt] @ A[..., ot:ot + rt, :]            # rows s ≤ t of GB_st A_t
        for s, (os_, rs) in enumerate(offs[:t + 1]):
            q = (Z[..., os_:os_ + rs, :] * A[..., os_:os_ + rs, :]).sum(-2)
            Q[..., s, t, :] = q
            if s != t:
                Q[..., t, s, :] = q
    return Q


def magnitudes_from_pairs(Q: Tensor) -> Tensor:
    """α (…, T, n) from `pair_products`' diagonal."""
    return torch.diagonal(Q, dim1=-3, dim2=-2).movedim(-1, -2).clamp_min(0).sqrt()


def combined_col_norms(Q: Tensor, c: Tensor) -> Tensor:
    """Column norms (…, n) of ``Σ_t B_t A_t diag(c_t)`` from `pair_products` Q (…, T, T, n) and the
    per-column coefficients c (…, T, n): ``‖·[:, k]‖² = Σ_st c_s[k] c_t[k] Q[s, t, k]``."""
    T = Q.shape[-3]
    sq = None
    for s in range(T):
        for t in range(s, T):
            term = c[..., s, :] * c[..., t, :] * Q[..., s, t, :]
            if s != t:
                term = term * 2.0
            sq = term if sq is None else sq + term
    return sq.clamp_min(0).sqrt()


def direction_down(A: Tensor, alpha: Tensor, ranks: Sequence[int], w: Optional[Tensor] = None) -> Tensor:
    """Stacked ``[A_1 diag(1/α_1); …]`` in one pass (a new tensor); with ``w`` (T,), the task
    coefficients are folded into the same pass: ``[w_1 A_1 diag(1/α_1); …]``."""
    inv = direction_coefficients(alpha, w)
    out = torch.empty_like(A)
    for t, (o, r) in enumerate(blocks(ranks)):
        torch.mul(A[..., o:o + r, :], inv[..., t, :].unsqueeze(-2), out=out[..., o:o + r, :])
    return out


def direction_coefficients(alpha: Tensor, w: Optional[Tensor] = None) -> Tensor:
    """(…, T, n) per-column coefficient of each task in the merged direction: ``1/α_t``, times
    ``w_t`` when given (what `direction_down` applies to the down factor's block t)."""
    inv = _inverse_magnitude(alpha)
    if w is not None:
        inv = inv * w.to(inv.dtype).unsqueeze(-1)
    return inv


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
                    GB: Optional[Tensor] = None, norms: Optional[Tensor] = None) -> Tensor:
    """The column scaling (…, 1, n) of the merged direction ``B @ A`` that recombination applies:
    v1 ``λ·α*``; v2 ``λ·α*/‖(BA)[:, k]‖`` (the column norms ``norms`` (…, n) when given, else from
    ``GB = BᵀB`` when given, else from B)."""
    if rule == "v1":
        return (lam * alpha_star).unsqueeze(-2)
    if rule == "v2":
        if norms is None:
            norms = col_norms(B, A) if GB is None else ((GB @ A) * A).sum(-2).clamp_min(0).sqrt()
        return (lam * alpha_star * _inverse_magnitude(norms)).unsqueeze(-2)
    raise ValueError(f"unknown recombine rule {rule!r} (use one of {', '.join(RECOMBINE_RULES)})")


def recombine_lowrank(B: Tensor, A: Tensor, alpha_star: Tensor, rule: str, lam: float,
                      inplace: bool = False, GB: Optional[Tensor] = None,
                      norms: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Low-rank recombination: a column scaling of the merged direction's down factor
    (in place on A when ``inplace``; for v2, ``norms``: the direction's column norms if known, or
    ``GB``: ``BᵀB`` if known)."""
    if rule in RECOMBINE_RULES:
        s = recombine_scale(B, A, alpha_star, rule, lam, GB, norms)
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
