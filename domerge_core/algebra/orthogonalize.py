"""Step 1 of DO-Merging: data-free orthogonalization of the LoRA factors (method.md §1).

Per module, with T LoRAs whose factors are stacked as ``B = [B_1 … B_T]`` (m×R) and
``A = [A_1; …; A_T]`` (R×n), perturb every factor (δ starts at 0) to lower

    L = Σ_{i<j} ‖Â_iÂ_jᵀ‖²/(a_i²a_j²) + Σ_{i<j} ‖B̂_iᵀB̂_j‖²/(b_i²b_j²) + γ Σ_i (‖δA_i‖²/a_i² + ‖δB_i‖²/b_i²)

(a_i = ‖A_i‖_F, b_i = ‖B_i‖_F, held constant).

**It runs in the span coordinates.** Every gradient term of ``Â_i`` lies in the row span of the
stacked A (dimension ≤ R), so after one QR per factor (``Aᵀ = Qa Ra``, ``B = Qb Rb``) the descent
runs on R×k coordinate matrices (rows = the factor's rank-one pieces, k = min(R, n)) at
O(T²r²R) per step, independent of the layer width, and maps back once. Both factor problems have
the same form, "rows X_i in blocks; push the cross-Grams X_iX_jᵀ to zero, stay close to X_i⁰", so
they are solved by one routine, batched over modules of equal shape (and over A and B together).

The descent works on the block-normalised coordinates ``Y_i = X_i/‖X_i⁰‖`` (that is the loss above,
and it makes the result scale-equivariant: scaling B_i by w scales B̂_i by w and leaves Â_i as it
is, so cached factors survive strength changes). Two optimizers, a named option [ours]:

- ``gd``: gradient descent with step ``lr/L``, L an upper bound of the loss's Hessian at the start
  (``2γ + maxᵢ Σ_{j≠i}(5σ_j² + σ_i²)``, σ² bounded by ``‖Y_jY_jᵀ‖_F``). Rotation-equivariant, so
  the result is the same as the descent on the full factors.
- ``adam``: Adam on the coordinates, step ``lr · 0.03 · RMS(Y_i⁰)`` per block. Not rotation-equivariant;
  it is its own (deterministic) choice.

The balanced form (method.md §0) is also taken inside the span coordinates (an r×r core SVD per
LoRA), so the large dimensions are only touched by the two QRs and the two map-backs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch

from .linalg import (balanced, blocks, safe_inverse, block_indicator, block_inner_products_from_grams, cosine_from_inner, mT,
                     span_qr)

Tensor = torch.Tensor

OPTIMIZERS = ("gd", "adam")
ADAM_BASE_LR = 0.03       # adam: lr=1 means a step of 0.03·RMS of the block's coordinates


@dataclass(frozen=True)
class OrthOptions:
    """The descent's options. No defaults here: they live in the method registry's `Param`s
    (``orth_*``, ``balanced``), and the engine builds this from the resolved parameters."""
    steps: int
    lr: float
    gamma: float
    optimizer: str
    balanced: bool

    def key(self) -> Tuple:
        return (self.steps, self.lr, self.gamma, self.optimizer, self.balanced)


@dataclass
class OrthResult:
    B: Optional[Tensor]       # (N, m, R) orthogonalized (or only balanced) up factors (None: see right_B)
    A: Tensor                 # (N, R, n)
    cos_before: Tensor        # (N, T, T) cosine of the task updates before the descent
    cos_after: Tensor         # (N, T, T) after
    rel_delta_A: Tensor       # (N, T) ‖δA_i‖/‖A_i‖ (relative to the balanced factors)
    rel_delta_B: Tensor       # (N, T)
    loss_before: Tensor       # (N,) the normalised loss at δ = 0
    loss_after: Tensor        # (N,)
    norms_before: Tensor      # (N, T) ‖ΔW_i‖_F (strength 1)
    norms_after: Tensor       # (N, T) ‖B̂_iÂ_i‖_F
    GB: Optional[Tensor] = None   # (N, R, R) B̂ᵀB̂ (for the decouple magnitudes)
    right_B: Optional[Tensor] = None   # (N, R, R) with B̂ = B @ right_B (gram route; None: B̂ = B)


def _safe_ratio(num: Tensor, den: Tensor) -> Tensor:
    """num/den, and 0 where den is 0 (a zero block: ‖δ‖/‖X‖ is 0, not 0/0)."""
    tiny = torch.finfo(den.dtype).tiny
    return torch.where(den > tiny, num / den.clamp_min(tiny), torch.zeros_like(num))


def gd_step(G0: Tensor, E: Tensor, opts: OrthOptions) -> Tensor:
    """The gd step ``lr/L`` (…, 1, 1) for the normalised Gram ``G0 = Y⁰Y⁰ᵀ`` (…, R, R), with L an
    upper bound of the loss's Hessian at the start: ``2γ + maxᵢ Σ_{j≠i}(5σ_j² + σ_i²)``, σ_j²
    bounded by ``‖Y_jY_jᵀ‖_F``. Both descent routes use it."""
    s = (((G0 * G0) * (E @ mT(E))) @ E).sum(-2).clamp_min(0).sqrt()        # (…, T) ‖Y_jY_jᵀ‖_F
    tot = s.sum(-1, keepdim=True)
    T = E.shape[-1]
    bound = (5.0 * (tot - s) + (T - 1) * s).amax(-1)                        # (…,)
    return (float(opts.lr) / (2.0 * float(opts.gamma) + bound).clamp_min(1e-12)).reshape(*bound.shape, 1, 1)


def _block_norms(X: Tensor, E: Tensor) -> Tensor:
    """Frobenius norm of each block of rows (…, T)."""
    return ((X * X).sum(-1) @ E).clamp_min(0).sqrt()


def _cross_loss(Y: Tensor, off: Tensor) -> Tensor:
    G = Y @ mT(Y)
    return 0.5 * ((G * G) * off).sum((-1, -2))


def descend(X0: Tensor, ranks: Sequence[int], opts: OrthOptions) -> Tuple[Tensor, Tensor, Tensor]:
    """Minimise ``Σ_{i<j}‖Y_iY_jᵀ‖² + γΣ‖Y_i − Y_i⁰‖²`` over block-normalised rows of X (…, R, k).

    Returns (X, loss_before, loss_after) with X in the original (un-normalised) scale.
    """
    E = block_indicator(ranks, X0.device, X0.dtype)                 # R×T
    off = 1.0 - E @ mT(E)                                            # 1 on cross-block entries
    nrm = _block_norms(X0, E)                                        # (…, T)
    row_scale = nrm @ mT(E)                                          # (…, R)
    inv = safe_inverse(row_scale)
    Y0 = X0 * inv.unsqueeze(-1)
    gamma = float(opts.gamma)
    loss0 = _cross_loss(Y0, off)
    if opts.steps <= 0 or len(ranks) < 2:
        return X0.clone(), loss0, loss0
    Y = Y0.clone()
    if opts.optimizer == "gd":
        step = gd_step(Y0 @ mT(Y0), E, opts)
        for _ in range(int(opts.steps)):
            G = Y @ mT(Y)
            grad = 2.0 * ((G * off) @ Y) + (2.0 * gamma) * (Y - Y0)
            Y = Y - step * grad
    elif opts.optimizer == "adam":
        b1, b2 = 0.9, 0.999
        k = X0.shape[-1]
        r_rows = E @ torch.tensor([float(r) for r in ranks], device=X0.device, dtype=X0.dtype)   # (R,)
        rms = 1.0 / (r_rows * k).sqrt()                                 # RMS of a unit-norm block
        lr = (float(opts.lr) * ADAM_BASE_LR * rms).unsqueeze(-1)                       # (R, 1)
        eps = 1e-8 * rms.unsqueeze(-1)
        m = torch.zeros_like(Y)
        v = torch.zeros_like(Y)
        for t in range(1, int(opts.steps) + 1):
            G = Y @ mT(Y)
            grad = 2.0 * ((G * off) @ Y) + (2.0 * gamma) * (Y - Y0)
            m.mul_(b1).add_(grad, alpha=1 - b1)
            v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
            mhat = m / (1 - b1 ** t)
            vhat = v / (1 - b2 ** t)
            Y = Y - lr * mhat / (vhat.sqrt() + eps)
    else:
        raise ValueError(f"unknown optimizer {opts.optimizer!r} (use one of {', '.join(OPTIMIZERS)})")
    Y = Y * (inv.unsqueeze(-1) > 0)              # zero blocks stay zero
    return Y * row_scale.unsqueeze(-1), loss0, _cross_loss(Y, off)


def _balance_in_coords(XB: Tensor, XA: Tensor, ranks: Sequence[int]) -> Tuple[Tensor, Tensor]:
    """Balanced form of every LoRA, computed on its span coordinates (rows × k)."""
    outB, outA = [], []
    for o, r in blocks(ranks):
        b, a = balanced(mT(XB[..., o:o + r, :]), XA[..., o:o + r, :])
        outB.append(mT(b))
        outA.append(a)
    return torch.cat(outB, -2), torch.cat(outA, -2)


def orthogonalize(B: Tensor, A: Tensor, ranks: Sequence[int], opts: OrthOptions, run_descent: bool = True,
                  route: str = "auto", map_up: bool = True) -> OrthResult:
    """Balanced form (if ``opts.balanced``) and the descent (if ``run_descent``) for stacked factors
    ``B`` (N, m, R), ``A`` (N, R, n) of T = len(ranks) LoRAs (strengths not applied).

    ``route``: ``gram`` (gd only: the descent as an R×R transform of the rows, from the Grams — no
    QR), ``qr`` (span coordinates from a QR of each stacked factor; any optimizer), ``auto``
    (gram for gd, qr for adam). Both give the same result for gd (tested). ``map_up=False`` (gram
    route): ``B`` is left None and ``right_B`` says how to map it, so a caller can apply the R×R
    transform on the cheaper side of the merged update (``B @ (right_B @ D)``)."""
    if route == "auto":
        route = "gram" if opts.optimizer == "gd" else "qr"
    if route == "gram":
        if opts.optimizer != "gd":
            raise ValueError("the gram route runs gradient descent only")
        return orthogonalize_gram(B, A, ranks, opts, run_descent, map_up)
    return orthogonalize_qr(B, A, ranks, opts, run_descent)


def orthogonalize_qr(B: Tensor, A: Tensor, ranks: Sequence[int], opts: OrthOptions,
                     run_descent: bool = True) -> OrthResult:
    """The descent on explicit span coordinates (QR of the stacked factors)."""
    Qb, Rb, Qa, Ra = span_qr(B, A)
    XB, XA = mT(Rb), mT(Ra)                       # rows: coordinates of B's columns / A's rows
    if opts.balanced:
        XB, XA = _balance_in_coords(XB, XA, ranks)
    GB0, GA0 = XB @ mT(XB), XA @ mT(XA)
    K0 = block_inner_products_from_grams(GB0, GA0, ranks)
    cos_before = cosine_from_inner(K0)
    K1 = K0
    E = block_indicator(ranks, XA.device, XA.dtype)
    if run_descent and len(ranks) > 1 and opts.steps > 0:
        if XA.shape[-1] == XB.shape[-1]:
            N = XA.shape[0]
            X, l0, l1 = descend(torch.cat([XA, XB], 0), ranks, opts)
            XA1, XB1 = X[:N], X[N:]
            loss0, loss1 = l0[:N] + l0[N:], l1[:N] + l1[N:]
        else:
            XA1, la0, la1 = descend(XA, ranks, opts)
            XB1, lb0, lb1 = descend(XB, ranks, opts)
            loss0, loss1 = la0 + lb0, la1 + lb1
        GB1, GA1 = XB1 @ mT(XB1), XA1 @ mT(XA1)
        K1 = block_inner_products_from_grams(GB1, GA1, ranks)
        cos_after = cosine_from_inner(K1)
        dA = _safe_ratio(_block_norms(XA1 - XA, E), _block_norms(XA, E))
        dB = _safe_ratio(_block_norms(XB1 - XB, E), _block_norms(XB, E))
    else:
        XA1, XB1, cos_after = XA, XB, cos_before
        dA = dB = torch.zeros(XA.shape[:-2] + (len(ranks),), dtype=XA.dtype, device=XA.device)
        loss0 = loss1 = torch.zeros(XA.shape[:-2], dtype=XA.dtype, device=XA.device)
    return OrthResult(B=Qb @ mT(XB1), A=XA1 @ mT(Qa), cos_before=cos_before, cos_after=cos_after,
                      rel_delta_A=dA, rel_delta_B=dB, loss_before=loss0, loss_after=loss1,
                      norms_before=_diag_sqrt(K0), norms_after=_diag_sqrt(K1),
                      GB=XB1 @ mT(XB1) if run_descent else GB0)


def _diag_sqrt(K: Tensor) -> Tensor:
    return torch.diagonal(K, dim1=-2, dim2=-1).clamp_min(0).sqrt()


def mean_abs_offdiag(C: Tensor) -> Tensor:
    """Mean |cos| over pairs i<j (…,)."""
    T = C.shape[-1]
    if T < 2:
        return torch.zeros(C.shape[:-2], dtype=C.dtype, device=C.device)
    iu = torch.triu_indices(T, T, 1, device=C.device)
    return C[..., iu[0], iu[1]].abs().mean(-1)


# ---------------------------------------------------------------------------------------------
# The gram route: gradient descent as a left transform of the coordinate rows.
#
# With rows Y = P·Y⁰ (P = I at the start) the gd update of Y is again a left product,
#     P ← P − η [2 ((P G⁰ Pᵀ) ⊙ off) P + 2γ (P − I)],     G⁰ = Y⁰Y⁰ᵀ (the normalised Gram),
# so the whole descent needs only the R×R Gram of each stacked factor, and the result maps back as
# Â = T_A A, B̂ = B T_Bᵀ with T = D P D⁻¹ (D: block norms). No QR, no basis: exactly the gd on the
# full factors. The balanced form is a block-diagonal gauge (B M_B, M_A A) computed from the r×r
# Grams of each LoRA (eigh + core SVD, in float64).


def _balance_block_eigh(gb: Tensor, ga: Tensor, tol: float) -> Tuple[Tensor, Tensor]:
    """Gauges from symmetric square roots (handles rank-deficient factors: directions whose
    singular value is below ``tol`` of the factor's largest are treated as null)."""
    lb, vb = torch.linalg.eigh(gb)
    la, va = torch.linalg.eigh(ga)
    sb = lb.clamp_min(0).sqrt()
    sa = la.clamp_min(0).sqrt()
    okb = sb > tol * sb.amax(-1, keepdim=True).clamp_min(1e-300)
    oka = sa > tol * sa.amax(-1, keepdim=True).clamp_min(1e-300)
    isb = torch.where(okb, 1.0 / sb.clamp_min(1e-300), torch.zeros_like(sb))
    isa = torch.where(oka, 1.0 / sa.clamp_min(1e-300), torch.zeros_like(sa))
    half_b = (vb * sb.unsqueeze(-2)) @ mT(vb)
    half_a = (va * sa.unsqueeze(-2)) @ mT(va)
    U, S, Vh = torch.linalg.svd(half_b @ half_a)
    rs = S.clamp_min(0).sqrt()
    mb = (vb * isb.unsqueeze(-2)) @ mT(vb) @ U * rs.unsqueeze(-2)
    ma = rs.unsqueeze(-1) * Vh @ ((va * isa.unsqueeze(-2)) @ mT(va))
    return mb, ma


def _balance_block_chol(gb: Tensor, ga: Tensor, tol: float) -> Optional[Tuple[Tensor, Tensor]]:
    """Gauges from Cholesky factors (the R factors of B and Aᵀ up to an orthogonal Q); None when a
    Gram is not comfortably positive definite (then the eigh route is used)."""
    Lb, ib = torch.linalg.cholesky_ex(gb)
    La, ia = torch.linalg.cholesky_ex(ga)
    if bool((ib != 0).any()) or bool((ia != 0).any()):
        return None
    for L in (Lb, La):
        d = torch.diagonal(L, dim1=-2, dim2=-1)
        if bool((d.amin(-1) <= tol * d.amax(-1)).any()):
            return None
    U, S, Vh = torch.linalg.svd(mT(Lb) @ La)          # core R_B R_Aᵀ with R_B = L_bᵀ, R_A = L_aᵀ
    rs = S.clamp_min(0).sqrt()
    mb = torch.linalg.solve_triangular(mT(Lb), U * rs.unsqueeze(-2), upper=True)
    ma = mT(torch.linalg.solve_triangular(mT(La), mT(Vh) * rs.unsqueeze(-2), upper=True))
    return mb, ma


def balance_gauges(GB: Tensor, GA: Tensor, ranks: Sequence[int]) -> Tuple[Tensor, Tensor]:
    """Block-diagonal (…, R, R) ``M_B``, ``M_A`` with ``(B M_B, M_A A)`` the balanced form of every
    LoRA (``U√S``, ``√S Vᵀ`` of its product), from its Grams ``BᵢᵀBᵢ`` and ``AᵢAᵢᵀ``, in float64.

    Cholesky when the Grams are well conditioned, else symmetric square roots with directions
    whose singular value is below ``10·√eps`` (compute dtype) of the factor's largest treated as
    null (they carry < 1e-6 of the energy in float32, and a Gram cannot resolve them)."""
    dt = GB.dtype
    if GB.device.type == "mps":               # no float64 there: the r×r work runs on the CPU
        mb, ma = balance_gauges(GB.cpu(), GA.cpu(), ranks)
        return mb.to(GB.device), ma.to(GB.device)
    tol = 10.0 * (torch.finfo(dt).eps ** 0.5)
    MB = torch.zeros(GB.shape, dtype=torch.float64, device=GB.device)
    MA = torch.zeros_like(MB)
    for o, r in blocks(ranks):
        gb = GB[..., o:o + r, o:o + r].double()
        ga = GA[..., o:o + r, o:o + r].double()
        res = _balance_block_chol(gb, ga, tol)
        mb, ma = res if res is not None else _balance_block_eigh(gb, ga, tol)
        MB[..., o:o + r, o:o + r] = mb
        MA[..., o:o + r, o:o + r] = ma
    return MB.to(dt), MA.to(dt)


def descend_gram(G: Tensor, ranks: Sequence[int], opts: OrthOptions) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """gd on the rows of a factor given only its Gram G = XXᵀ (…, R, R).

    Returns (Tm, G1, loss_before, loss_after): the rows map as X̂ = Tm X, and G1 = X̂X̂ᵀ."""
    E = block_indicator(ranks, G.device, G.dtype)
    off = 1.0 - E @ mT(E)
    nrm = (torch.diagonal(G, dim1=-2, dim2=-1) @ E).clamp_min(0).sqrt()      # (…, T)
    row = nrm @ mT(E)                                                         # (…, R)
    inv = safe_inverse(row)
    G0 = G * inv.unsqueeze(-1) * inv.unsqueeze(-2)
    loss0 = 0.5 * ((G0 * G0) * off).sum((-1, -2))
    eye = torch.eye(G.shape[-1], dtype=G.dtype, device=G.device)
    gamma = float(opts.gamma)
    step = gd_step(G0, E, opts)
    c1 = 1.0 - 2.0 * gamma * step                 # (…, 1, 1)
    c2 = 2.0 * gamma * step
    W = off * (2.0 * step)                         # per-module scaled cross-block mask
    P = H = None
    L, info = torch.linalg.cholesky_ex(G0 + 0.0 * eye) if G0.device.type != "mps" else (None, None)
    if L is not None and not bool((info != 0).any()):
        d = torch.diagonal(L, dim1=-2, dim2=-1)
        live = row > 0                                                     # zero blocks: zero rows
        dmin = torch.where(live, d, torch.full_like(d, float("inf"))).amin(-1)
        if bool((dmin > 1e-3 * d.amax(-1)).all()):
            # Y route: rows Y with Y⁰ = L (YYᵀ = G⁰), 2 products per step; P = Y L⁻¹ at the end.
            Y0c = c2 * L
            Y = L.clone()
            if Y.dim() == 3:
                # the same step with its R×R work in two preallocated buffers and one fused
                # elementwise op (c1·Y + c2·Y⁰): the two products dominate, the rest was
                # allocations and extra passes
                Yn, Gy = torch.empty_like(Y), torch.empty_like(Y)
                for _ in range(int(opts.steps)):
                    torch.bmm(Y, mT(Y), out=Gy).mul_(W)
                    torch.addcmul(Y0c, c1, Y, out=Yn).baddbmm_(Gy, Y, alpha=-1.0)
                    Y, Yn = Yn, Y
            else:
                for _ in range(int(opts.steps)):
                    Y = c1 * Y + Y0c - ((Y @ mT(Y)) * W) @ Y
            P = torch.linalg.solve_triangular(L, Y, upper=False, left=False)
            H = Y @ mT(Y)                         # = P G⁰ Pᵀ (G⁰ = LLᵀ, P = Y L⁻¹), one product
    if P is None:
        # P route (any Gram, also singular): P ← c1 P + c2 I − 2η ((P G⁰ Pᵀ) ⊙ off) P
        P = eye.expand_as(G0).clone()
        for _ in range(int(opts.steps)):
            H = P @ G0 @ mT(P)
            P = c1 * P + c2 * eye - (H * W) @ P
        H = P @ G0 @ mT(P)
    loss1 = 0.5 * ((H * H) * off).sum((-1, -2))
    Tm = row.unsqueeze(-1) * P * inv.unsqueeze(-2)
    G1 = H * row.unsqueeze(-1) * row.unsqueeze(-2)
    return Tm, G1, loss0, loss1


def _block_rel_delta(Tm: Tensor, G: Tensor, E: Tensor) -> Tensor:
    """‖X̂_i − X_i‖/‖X_i‖ per block from the transform and the Gram."""
    M = Tm - torch.eye(G.shape[-1], dtype=G.dtype, device=G.device)
    d2 = ((M @ G) * M).sum(-1) @ E
    n2 = torch.diagonal(G, dim1=-2, dim2=-1) @ E
    return _safe_ratio(d2.clamp_min(0), n2).sqrt()


def orthogonalize_gram(B: Tensor, A: Tensor, ranks: Sequence[int], opts: OrthOptions,
                       run_descent: bool = True, map_up: bool = True) -> OrthResult:
    """Balanced form + gd descent through R×R Grams and one map-back product per factor."""
    GB = mT(B) @ B
    GA = A @ mT(A)
    MB = MA = None
    if opts.balanced:
        MB, MA = balance_gauges(GB, GA, ranks)
        GB = mT(MB) @ GB @ MB
        GA = MA @ GA @ mT(MA)
    K0 = block_inner_products_from_grams(GB, GA, ranks)
    N = GB.shape[0]
    E = block_indicator(ranks, GB.device, GB.dtype)
    if run_descent and len(ranks) > 1 and opts.steps > 0:
        Tm, G1, l0, l1 = descend_gram(torch.cat([GA, GB], 0), ranks, opts)
        TA, TB = Tm[:N], Tm[N:]
        GA1, GB1 = G1[:N], G1[N:]
        dA = _block_rel_delta(TA, GA, E)
        dB = _block_rel_delta(TB, GB, E)
        loss0, loss1 = l0[:N] + l0[N:], l1[:N] + l1[N:]
        K1 = block_inner_products_from_grams(GB1, GA1, ranks)
        left_A = TA @ MA if MA is not None else TA
        right_B = MB @ mT(TB) if MB is not None else mT(TB)
    else:
        K1 = K0
        GB1 = GB
        dA = dB = torch.zeros(GB.shape[:-2] + (len(ranks),), dtype=GB.dtype, device=GB.device)
        loss0 = loss1 = torch.zeros(GB.shape[:-2], dtype=GB.dtype, device=GB.device)
        left_A, right_B = MA, MB
    A_hat = left_A @ A if left_A is not None else A
    B_hat = (B @ right_B if right_B is not None else B) if map_up else None
    return OrthResult(B=B_hat, A=A_hat, cos_before=cosine_from_inner(K0), cos_after=cosine_from_inner(K1),
                      rel_delta_A=dA, rel_delta_B=dB, loss_before=loss0, loss_after=loss1,
                      norms_before=_diag_sqrt(K0), norms_after=_diag_sqrt(K1), GB=GB1, right_B=right_B)
