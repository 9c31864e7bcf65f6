"""Core Space merging (Panariello et al., "Accurate and efficient low-rank model merging in core
space", NeurIPS 2025).

Reference bases from the stacked factors — ``U_B`` (left singular vectors of ``[B_1 … B_T]``) and
``V_A`` (right singular vectors of ``[A_1; …; A_T]``) — and per-task R×R cores
``M_i = U_Bᵀ B_i A_i V_A`` (eq. 4–5); merge the cores, map back: ``ΔW = U_B · merge(M_i) · V_Aᵀ``
(eq. 6). Lossless alignment, exact low rank ≤ Σ r_i, and the merge itself runs on R×R blocks.

Rotation-equivariant merges give the same result in Core Space as on the updates themselves
(core-TA ≡ ``ta``, core-TSV ≡ ``tsv``, core-Iso-C ≡ ``iso_c``, core-Iso-CTS ≡ ``iso_cts``,
core-CART ≡ ``cart``), so only the entry-wise merges get their own ``core_*`` names here.
"""
from __future__ import annotations

from .base import LowRankUpdate, MethodContext, TaskSet
from .common import DROP_RATE, LAM, RESCALE, SIGN_METHOD, DENSITY
from .knots import _with_default
from .registry import MethodSpec, register
from .spaces import combine, core_space
from ..algebra.linalg import mT, svd_form


def core_merge(tasks: TaskSet, params: dict, ctx: MethodContext, how: str) -> LowRankUpdate:
    """``U_B · combine(M_1 … M_T) · V_Aᵀ`` (Core Space eq. 6) with ``how`` ∈ ta / ties / dare / dare_ties."""
    Qb, Ub, Qa, Va, cores = core_space(tasks)
    M = combine(cores, how, params, tasks, ctx, "#core")
    return LowRankUpdate(*svd_form(Qb, Ub @ M @ mT(Va), mT(Qa)))


def core_ties(tasks, params, ctx):
    return core_merge(tasks, params, ctx, "ties")


def core_dare(tasks, params, ctx):
    return core_merge(tasks, params, ctx, "dare")


def core_dare_ties(tasks, params, ctx):
    return core_merge(tasks, params, ctx, "dare_ties")


CORE_DENSITY = _with_default(DENSITY, DENSITY.default, "Fraction of each LoRA's core entries (per module, "
                             "largest |value|) kept before the sign election (the Core Space code's default: 0.3).")
_SPACE = " on the LoRAs' R×R cores in Core Space (SVD bases of the stacked factors); exact low rank ≤ Σ ranks."
register(MethodSpec(
    name="core_ties", label="Core-TIES",
    description="TIES (trim, sign election, disjoint mean)" + _SPACE,
    params=(LAM, CORE_DENSITY, SIGN_METHOD), fn=core_ties, lowrank=True))
register(MethodSpec(
    name="core_dare", label="Core-DARE",
    description="DARE drop and rescale, then sum" + _SPACE,
    params=(LAM, DROP_RATE, RESCALE), fn=core_dare, lowrank=True))
register(MethodSpec(
    name="core_dare_ties", label="Core-DARE-TIES",
    description="DARE drop and rescale, then TIES sign election and disjoint mean" + _SPACE,
    params=(LAM, DROP_RATE, RESCALE, SIGN_METHOD), fn=core_dare_ties, lowrank=True))
