"""Stage 3, combine: one batch's strengths → the method → recombine → λ → exact or truncated factors.

Strengths and λ scale one factor only (the smaller one for ``ta``; the direction's down factor
under decouple), on fresh tensors: the `Prepared` factors may be cached and are never modified.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from ..algebra.decouple import (combined_col_norms, direction_coefficients, direction_down, direction_weights,
                                merge_magnitudes, recombine_dense, recombine_lowrank, recombine_scale)
from ..algebra.linalg import block_indicator, factorize_dense, truncate, truncate_svd_form
from ..devices import fixed_cpu_threads
from ..methods.base import DenseUpdate, LowRankUpdate, TaskSet, Update
from .context import RunContext
from .plan import ModuleJob
from .prepare import Prepared

Tensor = torch.Tensor
Factors = Tuple[Tensor, Tensor, Tensor, Tensor]          # up (N,m,k), down (N,k,n), ks (N,), rel_err (N,)


def strengths(batch: Sequence[ModuleJob], ctx: RunContext) -> Tensor:
    """(N, T) strength of each active input on each module of the batch."""
    return torch.tensor([job.strengths for job in batch], dtype=ctx.dtype, device=ctx.device)


def _scale_up_side(batch: Sequence[ModuleJob]) -> bool:
    """Per-task coefficients go on the smaller factor (fewer bytes per slider move)."""
    first = batch[0].first
    return first.out_features <= first.in_features


def single(pre: Prepared, W: Tensor, ctx: RunContext, up_side: bool) -> LowRankUpdate:
    """One active input: every method is the identity, λ·w·ΔW exactly."""
    s = (ctx.lam * W[:, 0]).reshape(-1, 1, 1)
    return LowRankUpdate(pre.B * s, pre.A) if up_side else LowRankUpdate(pre.B, pre.A * s)


def method_inputs(pre: Prepared, W: Tensor, ctx: RunContext, up_side: bool
                  ) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """(up, down, α*) handed to the method: the tasks at their strengths, or under decouple the
    unit directions with coefficients ``w_i/g`` folded into the down factor, and the merged
    magnitudes α*."""
    if ctx.params["decouple"]:
        alpha = pre.magnitudes()
        down = direction_down(pre.A, alpha, pre.ranks, direction_weights(W))
        return pre.B, down, merge_magnitudes(alpha, W, ctx.params["magnitude"])
    per_row = W @ block_indicator(pre.ranks, ctx.device, ctx.dtype).T          # (N, R)
    if up_side:
        return pre.B * per_row.unsqueeze(-2), pre.A, None
    return pre.B, pre.A * per_row.unsqueeze(-1), None


def direction_norms(pre: Prepared, alpha: Tensor, wd: Tensor, rule: str) -> Optional[Tensor]:
    """v2's column norms (N, n) of the merged direction ``B̂ · direction_down(Â, α, w/g)`` from the
    prepared `pair_products` (no pass over the factors); None when not needed or not available."""
    if rule != "v2":
        return None
    Q = pre.pair_products()
    return None if Q is None else combined_col_norms(Q, direction_coefficients(alpha, wd))


def one_sided(pre: Prepared, W: Tensor, ctx: RunContext) -> Optional[LowRankUpdate]:
    """A linear method (``ta``, ``do``) on factors held as ``B_in @ right_B`` with the down side the
    smaller one (m > n): the merged update is ``B_in · (right_B · D)``, so the R×R transform, the
    strengths, the direction coefficients and the recombination (v2: column norms from GB̂) all go to
    the down factor, and the up factor is written as loaded (no m-side product). None when it does
    not apply."""
    p = ctx.params
    m, n = pre.B_in.shape[-2], pre.A.shape[-1]
    # the choice depends on the batch only (never on what a cache happens to hold): bit-identical
    # results warm and cold
    if not ctx.spec.linear or pre.right_B is None or m <= n:
        return None
    if p["decouple"]:
        alpha = pre.magnitudes()
        wd = direction_weights(W)
        D = direction_down(pre.A, alpha, pre.ranks, wd)
        # column norms of B̂·D come from GB̂ = B̂ᵀB̂ (v2), so D is scaled before the transform
        s = recombine_scale(None, D, merge_magnitudes(alpha, W, p["magnitude"]), p["recombine"], ctx.lam, pre.GB,
                            direction_norms(pre, alpha, wd, p["recombine"]))
        return LowRankUpdate(pre.B_in, pre.right_B @ D.mul_(s))
    per_row = W @ block_indicator(pre.ranks, ctx.device, ctx.dtype).T          # (N, R)
    return LowRankUpdate(pre.B_in, (pre.right_B * (ctx.lam * per_row).unsqueeze(-2)) @ pre.A)


def finish(upd: Update, alpha_star: Optional[Tensor], ctx: RunContext, fresh: Sequence[Tensor],
           pre: Optional[Prepared] = None, W: Optional[Tensor] = None) -> Update:
    """Recombine (decouple) and λ. ``fresh``: tensors this run made, which may be scaled in place;
    ``pre``: the batch's prepared factors (their Gram serves v2's column norms when the method
    kept the prepared up factor; for a linear method, with the strengths ``W``, their
    `pair_products` do)."""
    lam = ctx.lam
    owned = lambda t: any(t is f for f in fresh)          # noqa: E731
    if isinstance(upd, LowRankUpdate):
        if alpha_star is not None:
            kept = pre is not None and pre.mapped and upd.up is pre.B
            GB = pre.GB if kept else None
            norms = (direction_norms(pre, pre.magnitudes(), direction_weights(W), ctx.params["recombine"])
                     if kept and ctx.spec.linear and W is not None else None)
            return LowRankUpdate(*recombine_lowrank(upd.up, upd.down, alpha_star, ctx.params["recombine"], lam,
                                                    inplace=owned(upd.down), GB=GB, norms=norms))
        if lam == 1.0:
            return upd
        S = None if upd.S is None else upd.S * abs(lam)   # an SVD form stays one under λ ≥ 0
        if owned(upd.down):
            return LowRankUpdate(upd.up, upd.down.mul_(lam), S)
        if owned(upd.up):
            return LowRankUpdate(upd.up.mul_(lam), upd.down, S)
        return LowRankUpdate(upd.up * lam, upd.down, S)
    if isinstance(upd, DenseUpdate):
        D = upd.delta
        return DenseUpdate(recombine_dense(D, alpha_star, ctx.params["recombine"], lam)
                           if alpha_star is not None else D * lam)
    raise TypeError(f"method {ctx.spec.name!r} returned {type(upd).__name__}")


def factorize(upd: Update, pre: Prepared, ctx: RunContext) -> Factors:
    """The output factors: low-rank updates exactly (rank Σr) or truncated to rank / energy;
    dense updates factored at rank / energy, else at Σr (exactly when that is ≥ min(m, n)). No
    module is written at more rank than its layer can hold: a Σr above min(m, n) is factored
    exactly at min(m, n) (error 0)."""
    N = pre.A.shape[0]
    cap = min(pre.B_in.shape[-2], pre.A.shape[-1])
    if isinstance(upd, LowRankUpdate):
        if not ctx.truncating and upd.up.shape[-1] <= cap:
            return (upd.up, upd.down, torch.full((N,), upd.up.shape[-1], dtype=torch.long),
                    torch.zeros(N, dtype=torch.float64))
        rank = min(ctx.rank or cap, cap)
        if upd.S is not None:          # the method returned its exact SVD: truncation is a slice
            out = truncate_svd_form(upd.up, upd.down, upd.S, rank, ctx.energy)
        else:
            out = truncate(upd.up, upd.down, rank, ctx.energy)
    else:
        target = ctx.rank if ctx.rank is not None else sum(pre.ranks)
        with fixed_cpu_threads(upd.delta.device):    # the same bytes for any thread count (README)
            out = factorize_dense(upd.delta, target, ctx.energy, ctx.seed)
    ctx.tick("truncate", N)
    return out


def combine(batch: Sequence[ModuleJob], pre: Prepared, ctx: RunContext) -> Factors:
    """One batch, from its prepared factors to the output factors (on the device)."""
    W = strengths(batch, ctx)
    up_side = _scale_up_side(batch)
    upd: Optional[Update] = single(pre, W, ctx, up_side) if pre.tasks == 1 else one_sided(pre, W, ctx)
    if upd is None:
        up, down, alpha_star = method_inputs(pre, W, ctx, up_side)
        fresh = [t for t in (up, down) if t is not pre.B and t is not pre.A]
        tasks = TaskSet(up, down, list(pre.ranks), [j.key for j in batch], batch[0].inputs,
                        [ctx.tags[i] for i in batch[0].inputs])
        upd = finish(ctx.spec.fn(tasks, ctx.params, ctx.method_context()), alpha_star, ctx, fresh, pre, W)
    ctx.tick("merge", len(batch))
    return factorize(upd, pre, ctx)
