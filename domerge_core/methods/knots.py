"""KnOTS (Stoica et al., "Model merging with SVD to tie the KnOTS", ICLR 2025).

Align the LoRAs with one SVD of their concatenated updates ``[ΔW_1 … ΔW_T] = U Σ [V_1ᵀ … V_Tᵀ]``
(eq. 2), merge the per-task coefficient blocks ``Σ V_iᵀ`` (k×n) with an entry-wise method, and
map back with the shared U (eq. 3): ``ΔW = U · merge(Σ V_1ᵀ, …, Σ V_Tᵀ)``. Exact low rank
(rank ≤ Σ r_i): QR of the stacked factors and one k×R core SVD (`spaces.knots_space`).

As in the official code, the TIES trim, sign election and disjoint mean act on ``Σ V_iᵀ``
(``masking_ops.ties_masking`` + ``masked_merge('mean')``), and DARE drops entries of ``Σ V_iᵀ``.
Two deliberate differences: the trim keeps exactly ``int(density·k·n)`` entries per task and
module (PEFT's count; the official top-k keeps one more), and it is per module, not over the
whole model's concatenated vector.

KnOTS-TA is not registered: the alignment is lossless and TA linear, so it is ``ta`` exactly
(``knots_merge(..., "ta")`` is kept for that test).
"""
from __future__ import annotations

from ..algebra.linalg import _qr, mT, svd_form
from .base import LowRankUpdate, MethodContext, TaskSet
from .common import DROP_RATE, LAM, RESCALE, SIGN_METHOD, DENSITY
from .registry import MethodSpec, Param, register
from .spaces import combine, knots_space


def _with_default(p: Param, default, help_: str = "") -> Param:
    return Param(**{**p.__dict__, "default": default, "help": help_ or p.help})


def knots_merge(tasks: TaskSet, params: dict, ctx: MethodContext, how: str) -> LowRankUpdate:
    """``U · combine(Σ V_iᵀ)`` (KnOTS eq. 3) with ``how`` ∈ ta / ties / dare / dare_ties."""
    Qb, Uc, _, coeffs = knots_space(tasks)
    merged = combine(coeffs, how, params, tasks, ctx, "#knots")         # (N, k, n)
    Q, Rm = _qr(mT(merged))                                              # merged = Rmᵀ Qᵀ
    return LowRankUpdate(*svd_form(Qb, Uc @ mT(Rm), mT(Q)))


def knots_ties(tasks, params, ctx):
    return knots_merge(tasks, params, ctx, "ties")


def knots_dare(tasks, params, ctx):
    return knots_merge(tasks, params, ctx, "dare")


def knots_dare_ties(tasks, params, ctx):
    return knots_merge(tasks, params, ctx, "dare_ties")


# Same defaults as ties/dare (the ComfyUI node has one widget per parameter name, so a per-method float
# default would not reach it); the papers' settings are in the help, the quality benchmark settles them.
KNOTS_DENSITY = _with_default(DENSITY, DENSITY.default, "Fraction of each LoRA's KnOTS coefficients (per "
                              "module, largest |value|) kept before the sign election (the paper's ViT-B/32 "
                              "setting: 0.2).")
KNOTS_DROP = _with_default(DROP_RATE, DROP_RATE.default, "Probability of dropping each KnOTS coefficient of "
                           "each LoRA (seeded; the paper's ViT-B/32 KnOTS-DARE-TIES setting: 0.1).")

_SPACE = " in the KnOTS space (shared SVD basis of the concatenated LoRAs); exact low rank ≤ Σ ranks."
register(MethodSpec(
    name="knots_ties", label="KnOTS-TIES",
    description="TIES (trim, sign election, disjoint mean) on the LoRAs' aligned coefficients" + _SPACE,
    params=(LAM, KNOTS_DENSITY, SIGN_METHOD), fn=knots_ties, lowrank=True))
register(MethodSpec(
    name="knots_dare_ties", label="KnOTS-DARE-TIES",
    description="DARE drop and rescale, then TIES sign election and disjoint mean" + _SPACE,
    params=(LAM, KNOTS_DROP, RESCALE, SIGN_METHOD), fn=knots_dare_ties, lowrank=True))
register(MethodSpec(
    name="knots_dare", label="KnOTS-DARE",
    description="DARE drop and rescale, then sum" + _SPACE,
    params=(LAM, KNOTS_DROP, RESCALE), fn=knots_dare, lowrank=True))
