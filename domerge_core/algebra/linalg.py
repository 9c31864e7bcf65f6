"""Low-rank algebra on factor pairs, never building the m×n update.

Every function takes batched factors: ``B`` (..., m, R) ("up") and ``A`` (..., R, n) ("down"),
whose product ``B @ A`` is the update; leading dimensions batch modules of equal shape.

- `exact_svd`: the exact thin SVD of ``B @ A`` through QR of both factors and an R×R core SVD
  (``O((m+n)R² + R³)``; `research/lora_formats.md` §2.2).
- `truncate`: the best rank-k factorisation of ``B @ A`` (by rank or kept energy), with the exact
  relative Frobenius error ``sqrt(Σ_{j>k} σ_j² / Σ_j σ_j²)``.
- `balanced`: ``U√S``, ``√S Vᵀ`` — a gauge-free factorisation (method.md §0).
- `block_inner_products`: the T×T matrix ``⟨B_iA_i, B_jA_j⟩_F`` from r×r Grams (§2.3).
- `col_norms`: column norms of ``B @ A`` from ``BᵀB`` (§2.4).
"""
from __future__ import annotations

from typing import Iterator, Optional, Sequence, Tuple

import torch

Tensor = torch.Tensor


def mT(x: Tensor) -> Tensor:
    return x.transpose(-1, -2)


def _qr(x: Tensor) -> Tuple[Tensor, Tensor]:
    """Reduced QR; MPS has no QR kernel, so it runs on CPU there."""
    if x.device.type == "mps":
        q, r = torch.linalg.qr(x.cpu())
        return q.to(x.device), r.to(x.device)
    return torch.linalg.qr(x)


def _svd(x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    if x.device.type == "mps":
        u, s, vh = torch.linalg.svd(x.cpu(), full_matrices=False)
        return u.to(x.device), s.to(x.device), vh.to(x.device)
    return torch.linalg.svd(x, full_matrices=False)


def span_qr(B: Tensor, A: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``B = Qb Rb`` and ``Aᵀ = Qa Ra``: orthonormal bases of the column span of B and the row span of A.

    Returns (Qb (…,m,kb), Rb (…,kb,R), Qa (…,n,ka), Ra (…,ka,R)) with kb = min(m,R), ka = min(n,R).
    """
    Qb, Rb = _qr(B)
    Qa, Ra = _qr(mT(A))
    return Qb, Rb, Qa, Ra


def exact_svd(B: Tensor, A: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Thin SVD ``U diag(S) Vh = B @ A`` (exact up to rounding), descending S."""
    Qb, Rb, Qa, Ra = span_qr(B, A)
    Uc, S, Vhc = _svd(Rb @ mT(Ra))
    return Qb @ Uc, S, Vhc @ mT(Qa)


def blocks(ranks: Sequence[int]) -> Iterator[Tuple[int, int]]:
    """``(offset, r)`` of each input's block in stacked factors of the given ranks."""
    o = 0
    for r in ranks:
        yield o, r
        o += r


def choose_rank(S: Tensor, rank: Optional[int] = None, energy: Optional[float] = None,
                total_sq: Optional[Tensor] = None) -> Tensor:
    """Per-module kept rank (…,) from singular values S (…,k): ``rank`` caps it, ``energy`` keeps the
    smallest k whose Σσ² reaches that fraction of ``total_sq`` (default Σσ² over S: pass the whole
    update's energy when S holds only the leading values). At least 1, at most len(S)."""
    k_all = S.shape[-1]
    ks = torch.full(S.shape[:-1], k_all, dtype=torch.long, device=S.device)
    if energy is not None:
        e2 = S.double() ** 2
        total = e2.sum(-1, keepdim=True) if total_sq is None else total_sq.double().unsqueeze(-1)
        frac = torch.cumsum(e2, -1) / total.clamp_min(1e-300)
        # number of leading values needed: count of cum-fractions strictly below target, plus one
        need = (frac < (float(energy) - 1e-12)).sum(-1) + 1
        ks = torch.minimum(ks, need)
    if rank is not None:
        ks = ks.clamp(max=int(rank))
    return ks.clamp(min=1, max=k_all)


def relative_tail_error(S: Tensor, ks: Tensor, total_sq: Optional[Tensor] = None) -> Tensor:
    """``sqrt(Σ_{j>k} σ_j² / total)`` per module; total defaults to Σ_j σ_j² (all of S)."""
    e2 = S.double() ** 2
    idx = torch.arange(S.shape[-1], device=S.device)
    kept = (e2 * (idx < ks.unsqueeze(-1))).sum(-1)
    if total_sq is None:
        total_sq = e2.sum(-1)
    total_sq = total_sq.double()
    tail = (total_sq - kept).clamp_min(0)
    return torch.where(total_sq > 0, (tail / total_sq.clamp_min(1e-300)).sqrt(), torch.zeros_like(tail))


def split_sqrt(U: Tensor, S: Tensor, Vh: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    """Factors ``(U_k √S_k, √S_k Vh_k)`` — the balanced rank-k factorisation."""
    rs = S[..., :k].clamp_min(0).sqrt()
    return U[..., :k] * rs.unsqueeze(-2), rs.unsqueeze(-1) * Vh[..., :k, :]


def truncate(B: Tensor, A: Tensor, rank: Optional[int] = None, energy: Optional[float] = None
             ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Best factorisation of ``B @ A`` at the requested rank / energy (Eckart–Young, exact).

    Returns (up (…,m,kmax), down (…,kmax,n), ranks (…,), rel_err (…,) float64). In a batch the
    modules may keep different ranks (energy): columns past a module's own rank are zero, and the
    caller slices ``[..., :ranks[i]]``.
    """
    U, S, Vh = exact_svd(B, A)
    ks = choose_rank(S, rank, energy)
    up, down = keep_leading(U, S, Vh, ks)
    return up, down, ks, relative_tail_error(S, ks)


def keep_leading(U: Tensor, S: Tensor, Vh: Tensor, ks: Tensor) -> Tuple[Tensor, Tensor]:
    """Balanced factors of the leading ``ks`` (…,) singular triplets, padded with zero columns /
    rows to the batch's largest k (the caller slices each module to its own rank)."""
    kmax = int(ks.max()) if ks.numel() else 1
    up, down = split_sqrt(U, S, Vh, kmax)
    if ks.numel() and int(ks.min()) < kmax:
        keep = (torch.arange(kmax, device=S.device) < ks.unsqueeze(-1)).to(up.dtype)
        up = up * keep.unsqueeze(-2)
        down = down * keep.unsqueeze(-1)
    return up, down


DENSE_EXACT_SVD_MAX = 512            # min(m, n) up to which a dense module gets a full SVD


def factorize_dense(D: Tensor, rank: int, energy: Optional[float] = None, seed: int = 0
                    ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Factor dense updates (N,m,n) at ≤ ``rank`` (and ``energy``): exact when rank ≥ min(m,n)
    and no energy target; a full SVD for small modules; else a seeded randomized SVD (range finder
    with 4 power iterations). Returns (up, down, ks, rel_err) as `truncate`; the reported error is
    exact for the factors returned (relative to the whole update, also when the randomized SVD
    saw only the leading values)."""
    N, m, n = D.shape
    p = min(m, n)
    if rank >= p and energy is None:
        eye = torch.eye(p, dtype=D.dtype, device=D.device).expand(N, p, p)
        zeros = torch.zeros(N, dtype=torch.float64, device=D.device)
        ks = torch.full((N,), p, dtype=torch.long, device=D.device)
        return (eye.clone(), D.clone(), ks, zeros) if m <= n else (D.clone(), eye.clone(), ks, zeros)
    total = (D.double() ** 2).sum((-1, -2))
    if p <= DENSE_EXACT_SVD_MAX:
        U, S, Vh = _svd(D)
    else:
        q = min(p, rank + 16)
        g = torch.Generator().manual_seed(int(seed) + 12345)
        omega = torch.randn(N, n, q, generator=g, dtype=D.dtype).to(D.device)
        Q, _ = _qr(D @ omega)
        for _ in range(4):
            Z, _ = _qr(mT(D) @ Q)
            Q, _ = _qr(D @ Z)
        Ub, S, Vh = _svd(mT(Q) @ D)
        U = Q @ Ub
    ks = choose_rank(S, rank, energy, total_sq=total)
    up, down = keep_leading(U, S, Vh, ks)
    return up, down, ks, relative_tail_error(S, ks, total)


def balanced(B: Tensor, A: Tensor) -> Tuple[Tensor, Tensor]:
    """``(U√S, √S Vᵀ)`` of ``B @ A`` with the input rank r kept: (…, m, r), (…, r, n).

    The product has at most min(r, m, n) singular values; when r exceeds m or n (a rank-64 LoRA on
    a conv with in·kh·kw = 36) the factors are padded with zero columns / rows, so the stacked
    factors of several LoRAs keep their block layout (a zero row is inert in every later step).
    The result does not depend on how a trainer split scale between up and down (``B g``, ``A/g``)
    nor on any invertible r×r gauge."""
    r = A.shape[-2]
    U, S, Vh = exact_svd(B, A)
    b, a = split_sqrt(U, S, Vh, S.shape[-1])
    k = b.shape[-1]
    if k < r:
        b = torch.cat([b, b.new_zeros(b.shape[:-1] + (r - k,))], -1)
        a = torch.cat([a, a.new_zeros(a.shape[:-2] + (r - k, a.shape[-1]))], -2)
    return b, a


def safe_inverse(x: Tensor, rel: float = 0.0) -> Tensor:
    """1/x, and 0 where x is 0, below ``rel`` times the largest value of its last dimension, or
    below the dtype's smallest normal number (its reciprocal would overflow): a zero column or
    block gets a zero, never an inf."""
    smallest = torch.finfo(x.dtype).tiny
    thr = (rel * x.amax(-1, keepdim=True)).clamp_min(smallest) if rel else smallest
    return torch.where(x > thr, 1.0 / x.clamp_min(smallest), torch.zeros_like(x))


def block_indicator(ranks: Sequence[int], device=None, dtype=torch.float32) -> Tensor:
    """E (R×T) with ``E[k, i] = 1`` when row k of the stacked factors belongs to input i."""
    R = sum(ranks)
    E = torch.zeros(R, len(ranks), device=device, dtype=dtype)
    for i, (o, r) in enumerate(blocks(ranks)):
        E[o:o + r, i] = 1
    return E


def block_inner_products_from_grams(GB: Tensor, GA: Tensor, ranks: Sequence[int]) -> Tensor:
    """``K_ij = ⟨B_iA_i, B_jA_j⟩_F = Σ (BᵢᵀBⱼ) ⊙ (AᵢAⱼᵀ)`` from the stacked Grams ``BᵀB``, ``AAᵀ`` (…,R,R)."""
    E = block_indicator(ranks, GB.device, GB.dtype)
    return mT(E) @ (GB * GA) @ E


def block_inner_products(B: Tensor, A: Tensor, ranks: Sequence[int]) -> Tensor:
    """T×T inner products of the per-input updates of stacked factors (…,m,R), (…,R,n)."""
    return block_inner_products_from_grams(mT(B) @ B, A @ mT(A), ranks)


def cosine_from_inner(K: Tensor, eps: float = 0.0) -> Tensor:
    """Cosine matrix from a Gram/inner-product matrix (zero where a norm is zero)."""
    d = torch.diagonal(K, dim1=-2, dim2=-1).clamp_min(0).sqrt()
    den = d.unsqueeze(-1) * d.unsqueeze(-2)
    return torch.where(den > eps, K / den.clamp_min(1e-300), torch.zeros_like(K))


def col_norms(B: Tensor, A: Tensor) -> Tensor:
    """Column norms of ``B @ A`` (…, n): ``‖(BA)[:,k]‖² = a_kᵀ (BᵀB) a_k``."""
    sq = ((mT(B) @ B @ A) * A).sum(-2)
    return sq.clamp_min(0).sqrt()


def frob_norm(B: Tensor, A: Tensor) -> Tensor:
    """``‖B A‖_F`` from the r×r Grams."""
    return ((mT(B) @ B) * (A @ mT(A))).sum((-1, -2)).clamp_min(0).sqrt()


# --------------------------------------------------------------------------------------------
# aligned merge spaces (KnOTS, Core Space, TSV, Iso): bases and whitening, all on thin factors

def polar(X: Tensor) -> Tensor:
    """Orthogonal polar factor ``P Qᵀ`` of ``X = P Σ Qᵀ`` (…, d, k), through a reduced QR of X and a
    small SVD of its triangular factor (``O(d k²)``, never d×d). Columns of X may be zero
    (they get whatever completion the SVD picks; callers give them zero weight)."""
    Q, Rx = _qr(X)
    a, _, bh = _svd(Rx)
    return Q @ (a @ bh)


def rank_mask(S: Tensor, rtol: Optional[float] = None) -> Tensor:
    """Boolean (…, k): singular values above ``rtol·σ_max`` (default ``1000·eps`` of S's dtype)."""
    if rtol is None:
        rtol = 1000 * torch.finfo(S.dtype).eps
    return S > rtol * S[..., :1].clamp_min(torch.finfo(S.dtype).tiny)


def svd_form(U: Tensor, core: Tensor, Vh: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """``U · core · Vh`` with orthonormal U (…, m, a) and Vh (…, b, n) as its exact SVD in factor form:
    ``(U u diag(s), vh Vh, s)`` from the a×b core's SVD (descending s)."""
    u, s, vh = _svd(core)
    return (U @ u) * s.unsqueeze(-2), vh @ Vh, s


def sort_svd_form(U: Tensor, S: Tensor, Vh: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Orthonormal U (…, m, k), S (…, k) ≥ 0 and orthonormal Vh (…, k, n), any order, as the factor form
    ``(U diag(S), Vh, S)`` sorted by descending S (stable: equal values keep their order)."""
    S, idx = torch.sort(S, dim=-1, descending=True, stable=True)
    U = torch.gather(U, -1, idx.unsqueeze(-2).expand(U.shape))
    Vh = torch.gather(Vh, -2, idx.unsqueeze(-1).expand(Vh.shape))
    return U * S.unsqueeze(-2), Vh, S


def truncate_svd_form(up: Tensor, down: Tensor, S: Tensor, rank: Optional[int] = None,
                      energy: Optional[float] = None) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """`truncate` for factors that already are an SVD (``up`` = orthogonal columns, ``down`` = orthogonal
    rows, S descending; any positive scale on either side): slice, balance each pair to equal norms,
    report the exact tail error from S. Same return as `truncate`."""
    ks = choose_rank(S, rank, energy)
    kmax = int(ks.max()) if ks.numel() else 1
    up, down = up[..., :kmax], down[..., :kmax, :]
    nu, nd = up.norm(dim=-2), down.norm(dim=-1)
    c = (nu * nd).sqrt()
    fu = torch.where(nu > 0, c / nu.clamp_min(torch.finfo(up.dtype).tiny), torch.zeros_like(nu))
    fd = torch.where(nd > 0, c / nd.clamp_min(torch.finfo(up.dtype).tiny), torch.zeros_like(nd))
    keep = (torch.arange(kmax, device=S.device) < ks.unsqueeze(-1)).to(up.dtype)
    return up * (fu * keep).unsqueeze(-2), down * (fd * keep).unsqueeze(-1), ks, relative_tail_error(S, ks)


def probe_signs(Q: Tensor, Y: Tensor) -> Tensor:
    """(…, 1, k): ±1 per column of ``Q @ Y`` (Q (…, m, a), Y (…, a, k)) making its inner product with a
    fixed pseudo-random probe vector positive — a deterministic sign gauge for singular vectors that
    never forms ``Q @ Y`` (m·a + a·k work; the probe is seeded, drawn in float64, the same on every
    device)."""
    m = Q.shape[-2]
    g = torch.randn(m, generator=torch.Generator().manual_seed(20250515), dtype=torch.float64)
    gq = g.to(device=Q.device, dtype=Q.dtype) @ Q                     # (…, a)
    return torch.where((gq.unsqueeze(-2) @ Y) < 0, -1.0, 1.0).to(Q.dtype)
