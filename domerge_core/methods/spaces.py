"""Aligned low-rank merge spaces shared by the KnOTS and Core Space methods.

Both express every task update in one shared pair of orthonormal bases of the LoRAs' spans and
merge the small per-task coefficient blocks there, so entry-wise methods (TIES, DARE) act on
aligned coordinates and the result is exactly low rank. Nothing here builds an m×n matrix: QR of
the stacked factors, r×r / R×R core SVDs, and coefficient blocks of size R×n (KnOTS) or R×R (Core
Space), with R = Σ r_i.
"""
from __future__ import annotations

from typing import List, Tuple

import torch

from ..algebra.linalg import _qr, _svd, exact_svd, mT, probe_signs
from .base import MethodContext, TaskSet, module_seed

Tensor = torch.Tensor


def span_cores(tasks: TaskSet) -> Tuple[Tensor, Tensor, List[Tuple[Tensor, Tensor]]]:
    """The stacked factors' spans and every task in their coordinates: ``B = Q_B R_B``,
    ``Aᵀ = Q_A R_A`` (one QR each, as ``ta``'s truncation does), and ``ΔW_i = Q_B C_i D_iᵀ Q_Aᵀ`` with
    ``C_i = R_B[:, i]`` (N, kb, r_i), ``D_i = R_A[:, i]`` (N, ka, r_i), kb = min(m, R), ka = min(n, R).
    A task's core ``K_i = C_i D_iᵀ`` has rank ≤ r_i, so its SVD is ``exact_svd(C_i, D_iᵀ)`` (r×r core).
    Every aligned method works on these and maps back once."""
    Qb, Rb = _qr(tasks.up)
    Qa, Ra = _qr(mT(tasks.down))
    return Qb, Qa, [(Rb[..., o:o + r], Ra[..., o:o + r]) for o, r in zip(tasks.offsets, tasks.ranks)]


def knots_space(tasks: TaskSet) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """KnOTS (Stoica et al., ICLR 2025, §3 eq. 2–3): the SVD of the concatenated updates
    ``[ΔW_1 … ΔW_T] = U Σ [V_1ᵀ … V_Tᵀ]`` gives the shared basis U and each task's coefficients
    ``Σ V_iᵀ = Uᵀ ΔW_i`` (k×n); ``ΔW_i = U (Σ V_iᵀ)`` exactly.

    ``[ΔW_1 … ΔW_T] = Q_B [K_1 … K_T] blockdiag(Q_Aᵀ)`` and the last factor has orthonormal rows, so
    ``U = Q_B U_c`` with U_c the left singular vectors of the kb × T·ka matrix ``[K_1 … K_T]``.
    Returns (Q_B, U_c (N, kb, k), Q_A, coefficients (T, N, k, n)), U's signs fixed by `probe_signs`.
    """
    Qb, Qa, blocks = span_cores(tasks)
    Uc, _, _ = _svd(torch.cat([c @ mT(d) for c, d in blocks], -1))
    Uc = Uc * probe_signs(Qb, Uc)
    # Uᵀ ΔW_i = (U_cᵀ R_B[:, i]) A_i: a k×r_i times r_i×n product per task
    coeffs = torch.stack([(mT(Uc) @ c) @ A for (c, _), A in zip(blocks, tasks.downs)], 0)
    return Qb, Uc, Qa, coeffs


def core_space(tasks: TaskSet) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Core Space (Panariello et al., NeurIPS 2025, §3 eq. 4–6): reference bases ``U_B`` = left
    singular vectors of ``[B_1 … B_T]`` and ``V_A`` = right singular vectors of ``[A_1; …; A_T]``, and
    the per-task cores ``M_i = U_Bᵀ ΔW_i V_A``; ``ΔW_i = U_B M_i V_Aᵀ`` exactly.

    The bases are taken from the LoRAs in balanced form ``(U_i√S_i, √S_i V_iᵀ)``, so they depend on
    the updates only, not on how a trainer or a file format split scale between up and down (the
    paper uses the raw factors; identical when those are balanced). All of it in the span
    coordinates of `span_cores`: ``U_B = Q_B U_b``, ``V_A = Q_A V_a``.
    Returns (Q_B, U_b, Q_A, V_a, cores (T, N, kb', ka')).
    """
    Qb, Qa, blocks = span_cores(tasks)
    bs, as_ = [], []
    for (C, D), r in zip(blocks, tasks.ranks):
        u, s, vh = exact_svd(C, mT(D))                         # balanced form of task i, in coordinates
        j = min(r, s.shape[-1])
        rs = s[..., :j].clamp_min(0).sqrt()
        b, a = u[..., :j] * rs.unsqueeze(-2), rs.unsqueeze(-1) * vh[..., :j, :]
        if j < r:                                              # rank above the layer width: zero-pad
            b = torch.cat([b, b.new_zeros(b.shape[:-1] + (r - j,))], -1)
            a = torch.cat([a, a.new_zeros(a.shape[:-2] + (r - j, a.shape[-1]))], -2)
        bs.append(b), as_.append(a)
    Ub, _, _ = _svd(torch.cat(bs, -1))
    _, _, Vah = _svd(torch.cat(as_, -2))
    Ub = Ub * probe_signs(Qb, Ub)
    Va = mT(Vah)
    Va = Va * probe_signs(Qa, Va)
    cores = torch.stack([(mT(Ub) @ C) @ (mT(D) @ Va) for C, D in blocks], 0)
    return Qb, Ub, Qa, Va, cores


def keep_masks(tasks: TaskSet, ctx: MethodContext, drop_rate: float, shape: Tuple[int, int],
               salt: str) -> Tensor:
    """DARE keep-masks (T, N, *shape) for coefficient blocks, drawn on the CPU from per-(module, input)
    seeds (``salt`` names the space, so the draws differ from the dense method's)."""
    out = []
    for i in range(len(tasks.ranks)):
        tag = (tasks.tags[i] if tasks.tags else str(tasks.inputs[i])) + salt
        per = []
        for key in tasks.keys:
            g = torch.Generator().manual_seed(module_seed(ctx.seed, key, tag))
            per.append(torch.rand(*shape, generator=g) >= drop_rate)
        out.append(torch.stack(per, 0))
    return torch.stack(out, 0).to(ctx.device)


def trim(x: Tensor, density: float) -> Tensor:
    """`base.magnitude_trim` (keep the ``int(density·a·b)`` largest |entries| of each block, ties at the
    threshold kept), with the threshold found by numpy's introselect on the CPU (~3× torch's kthvalue)."""
    if density >= 1.0:
        return x
    flat = x.reshape(*x.shape[:-2], -1)
    numel = flat.shape[-1]
    k = max(1, int(density * numel))
    a = flat.abs()
    if a.device.type == "cpu":
        import numpy as np
        thr = torch.from_numpy(np.partition(a.numpy(), numel - k, axis=-1)[..., numel - k:numel - k + 1])
    else:
        thr = a.kthvalue(numel - k + 1, dim=-1, keepdim=True).values
    return flat.masked_fill(a < thr, 0).reshape(x.shape)


def ties_mean(X: Tensor, sign_method: str) -> Tensor:
    """`base.elect_sign` + `base.disjoint_mean` in one pass (same values): elect the sign of each
    entry over the tasks (dim 0), average the entries that carry it (zeros do not count)."""
    s = X.sum(0) if sign_method == "total" else X.sign().sum(0) if sign_method == "frequency" else None
    if s is None:
        raise ValueError(f"unknown sign_method {sign_method!r} (use total or frequency)")
    agree = (X * torch.where(s >= 0, 1.0, -1.0).to(X.dtype)) > 0
    return torch.where(agree, X, 0).sum(0) / agree.sum(0).clamp_min(1).to(X.dtype)


def combine(X: Tensor, how: str, params: dict, tasks: TaskSet, ctx: MethodContext, salt: str) -> Tensor:
    """Merge aligned coefficient blocks X (T, N, a, b) entry-wise:

    - ``ta``: (per-task magnitude trim at ``density``, then) the sum;
    - ``ties``: trim, elect a sign per entry, disjoint mean (Yadav et al. 2023, eq. 1–3);
    - ``dare``: drop with probability ``drop_rate``, rescale, sum (Yu et al. 2023);
    - ``dare_ties``: DARE's drop and rescale, then sign election and disjoint mean.
    """
    if how in ("dare", "dare_ties"):
        p = params["drop_rate"]
        if p > 0:
            X = X * keep_masks(tasks, ctx, p, tuple(X.shape[-2:]), salt).to(X.dtype)
            if params["rescale"]:
                X = X / (1.0 - p)
        if how == "dare":
            return X.sum(0)
        return ties_mean(X, params["sign_method"])
    X = trim(X, params.get("density", 1.0))
    if how == "ta":
        return X.sum(0)
    if how == "ties":
        return ties_mean(X, params["sign_method"])
    raise ValueError(f"unknown combination {how!r}")
