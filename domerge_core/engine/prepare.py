"""Stage 2, prepare: everything about a batch that does not depend on the strengths or on λ.

Per batch of N equal-shape modules with T active inputs: the stacked factors with the format scale
folded into ``up``, [the balanced form and the orthogonalization], their diagnostics, and (on first
use) the decouple column magnitudes. None of it depends on the strengths (method.md §1: strengths
commute with the descent), so a `Prepared` is cached and reused across slider moves; it is never
modified once built.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..algebra.decouple import magnitudes, magnitudes_from_pairs, pair_products
from ..algebra.linalg import block_inner_products_from_grams, blocks, cosine_from_inner, frob_norm, mT
from ..algebra.orthogonalize import orthogonalize
from .context import RunContext
from .numerics import check_finite_stats
from .plan import ModuleJob

Tensor = torch.Tensor

# per-module statistics of a batch, (N, T) or (N, T, T); the report reads them
STAT_NAMES = ("cos_before", "cos_after", "rel_delta_A", "rel_delta_B", "norms", "norms_after")


@dataclass(eq=False)
class Prepared:
    """Strength-free factors of N modules, ``B`` (N, m, R) and ``A`` (N, R, n), R = Σ ranks, whose
    block products are the task updates (format scale folded in, balanced / orthogonalized when
    asked), plus their statistics. ``GB`` is ``BᵀB`` when the stage computed it.

    The up factor may be held as ``B_in @ right_B`` (the factor as loaded and an R×R transform):
    ``B`` maps it on first use, and a linear merge can instead apply ``right_B`` to its down
    factor (`transform_down`) when that side is the smaller one."""
    A: Tensor
    ranks: Tuple[int, ...]
    stats: Dict[str, Tensor]
    GB: Optional[Tensor]
    B_in: Tensor
    right_B: Optional[Tensor] = None
    _B: Optional[Tensor] = field(default=None, repr=False)
    _parent: Optional[Tuple["Prepared", int]] = field(default=None, repr=False)
    _alpha: Optional[Tensor] = field(default=None, repr=False)
    _pairs: Optional[Tensor] = field(default=None, repr=False)
    _lists: Optional[Dict[str, list]] = field(default=None, repr=False)

    @property
    def tasks(self) -> int:
        return len(self.ranks)

    @property
    def B(self) -> Tensor:
        if self._parent is not None:
            parent, j = self._parent
            return parent.B[j:j + 1]
        if self._B is None:
            self._B = self.B_in if self.right_B is None else self.B_in @ self.right_B
        return self._B

    @property
    def mapped(self) -> bool:
        """Whether ``B`` is at hand without a product (no transform, or already mapped)."""
        if self._parent is not None:
            return self._parent[0].mapped
        return self.right_B is None or self._B is not None

    def magnitudes(self) -> Tensor:
        """Column norms of every task update (N, T, n) — decouple's α, computed once from the
        r×r Grams (``GB``; then from `pair_products`) and the down factor."""
        if self._parent is not None:
            parent, j = self._parent
            return parent.magnitudes()[j:j + 1]
        if self._alpha is None:
            if self.GB is not None:
                self._alpha = magnitudes_from_pairs(self.pair_products())
            else:
                As = [self.A[..., o:o + r, :] for o, r in blocks(self.ranks)]
                Bs = [self.B[..., o:o + r] for o, r in blocks(self.ranks)]
                self._alpha = magnitudes(Bs, As)
        return self._alpha

    def pair_products(self) -> Optional[Tensor]:
        """(N, T, T, n) inner products of the task updates' columns (`decouple.pair_products`),
        computed once from ``GB`` and the down factor; None without ``GB``. Decouple's magnitudes
        and the v2 column norms of the merged direction at any strengths both come from it, so a
        slider move needs no pass over the factors for them."""
        if self._parent is not None:
            parent, j = self._parent
            Q = parent.pair_products()
            return None if Q is None else Q[j:j + 1]
        if self._pairs is None and self.GB is not None:
            self._pairs = pair_products(self.GB, self.A, self.ranks)
        return self._pairs

    def stat_lists(self) -> Dict[str, list]:
        """The statistics as Python lists (converted once; the report reads them per module)."""
        if self._lists is None:
            self._lists = {name: t.tolist() for name, t in self.stats.items()}
        return self._lists

    def row(self, j: int) -> "Prepared":
        """Module j alone: views of this batch (a cache entry; no copy)."""
        sl = slice(j, j + 1)
        return Prepared(self.A[sl], self.ranks, {k: v[sl] for k, v in self.stats.items()},
                        None if self.GB is None else self.GB[sl], self.B_in[sl],
                        None if self.right_B is None else self.right_B[sl], _parent=(self, j))

    @staticmethod
    def stack(rows: Sequence["Prepared"]) -> "Prepared":
        def cat(get):
            vals = [get(r) for r in rows]
            return None if any(v is None for v in vals) else torch.cat(vals, 0)
        first = rows[0]
        return Prepared(cat(lambda r: r.A), first.ranks, {k: cat(lambda r, k=k: r.stats[k]) for k in first.stats},
                        cat(lambda r: r.GB), cat(lambda r: r.B if r.mapped else r.B_in),
                        None if all(r.mapped for r in rows) else cat(lambda r: r.right_B))


def load_stack(batch: Sequence[ModuleJob], dtype, device) -> Tuple[Tensor, Tensor, Tuple[int, ...]]:
    """Stacked factors of the active inputs, format scale folded into up: (N,m,R), (N,R,n), ranks.
    Written straight into preallocated tensors (one conversion copy per factor)."""
    ranks = tuple(mod.rank for _, mod in batch[0].active)
    first = batch[0].first
    N, m, n, R = len(batch), first.out_features, first.in_features, sum(ranks)
    B = torch.empty(N, m, R, dtype=dtype, device=device)
    A = torch.empty(N, R, n, dtype=dtype, device=device)
    scales = torch.empty(N, R, dtype=dtype)
    unit = True
    for j, job in enumerate(batch):
        for (_, mod), (o, r) in zip(job.active, blocks(ranks)):
            up, down = mod.loader()
            B[j, :, o:o + r].copy_(up.reshape(m, r))
            A[j, o:o + r, :].copy_(down.reshape(r, n))
            scales[j, o:o + r] = float(mod.scale)
            unit = unit and float(mod.scale) == 1.0
    if not unit:               # alpha = rank (scale 1, the common case): ×1 is exact, skip the pass
        B.mul_(scales.to(device).unsqueeze(-2))
    return B, A, ranks


def _build(batch: Sequence[ModuleJob], ctx: RunContext) -> Prepared:
    B, A, ranks = load_stack(batch, ctx.dtype, ctx.device)
    if len(ranks) == 1:
        nrm = frob_norm(B, A).unsqueeze(-1)
        pre = Prepared(A, ranks, {"norms": nrm, "norms_after": nrm}, None, B)
    elif ctx.orthogonalizing:
        res = orthogonalize(B, A, ranks, ctx.orth_options(), map_up=False)
        stats = {"cos_before": res.cos_before, "cos_after": res.cos_after, "rel_delta_A": res.rel_delta_A,
                 "rel_delta_B": res.rel_delta_B, "norms": res.norms_before, "norms_after": res.norms_after}
        if res.B is not None:
            pre = Prepared(res.A, ranks, stats, res.GB, res.B)
        else:
            pre = Prepared(res.A, ranks, stats, res.GB, B, res.right_B)
    else:
        GB = mT(B) @ B
        K = block_inner_products_from_grams(GB, A @ mT(A), ranks)
        cos = cosine_from_inner(K)
        z = torch.zeros(B.shape[0], len(ranks), dtype=B.dtype, device=B.device)
        nrm = torch.diagonal(K, dim1=-2, dim2=-1).clamp_min(0).sqrt()
        pre = Prepared(A, ranks, {"cos_before": cos, "cos_after": cos, "rel_delta_A": z,
                                  "rel_delta_B": z, "norms": nrm, "norms_after": nrm}, GB, B)
    check_finite_stats(batch, pre.stats, ctx.sources, ctx.dtype, ctx.device)
    return pre


def module_key(job: ModuleJob, ctx: RunContext) -> Tuple:
    """What a module's prepared factors depend on: the module, which inputs are active (by their
    module objects' uids, never reused), the compute dtype and device, and the orthogonalization
    options when it runs."""
    okey = ctx.orth_options().key() if ctx.orthogonalizing and len(job.active) > 1 else None
    return (job.key, tuple((i, mod.uid) for i, mod in job.active), str(ctx.dtype), str(ctx.device), okey)


def prepare(batch: Sequence[ModuleJob], ctx: RunContext) -> Prepared:
    """The `Prepared` of a batch, from the cache when it has it: the very same stacked batch, or
    the batch stacked from per-module entries cached under another batching."""
    cache = ctx.cache
    keys = [module_key(job, ctx) for job in batch]
    bkey = tuple(keys)
    pre = cache.get_stacked(bkey) if cache is not None else None
    if pre is None and cache is not None:
        rows = [cache.get(k) for k in keys]
        if all(r is not None for r in rows):
            pre = Prepared.stack(rows)
            cache.put_stacked(bkey, pre, keys)
            for k, j in zip(keys, range(len(keys))):      # the entries now view the new stack
                cache.put(k, pre.row(j))
    if pre is None:
        pre = _build(batch, ctx)
        if cache is not None:
            for j, k in enumerate(keys):
                cache.put(k, pre.row(j))
            cache.put_stacked(bkey, pre, keys)
    if ctx.orthogonalizing and pre.tasks > 1:
        ctx.tick("orthogonalize", len(batch))
    return pre


def inactive_norms(jobs: Sequence[ModuleJob], ctx: RunContext) -> Dict[str, List[Tuple[int, float]]]:
    """``‖ΔW‖_F`` (strength 1) of every module of an input at strength 0 there: {key: [(input, norm)]}.
    The merge leaves these out, but the per-LoRA and per-block norms count every module a LoRA
    has. From r×r Grams; cached per module."""
    import math

    from .numerics import numerical_error, overflow_reason, update_norm
    out: Dict[str, List[Tuple[int, float]]] = {}
    for job in jobs:
        active = set(job.inputs)
        for i, mod in job.present:
            if i in active:
                continue
            ck = ("norm", job.key, mod.uid, str(ctx.dtype), str(ctx.device))
            v = ctx.cache.get_norm(ck) if ctx.cache is not None else None
            if v is None:
                v = update_norm(mod, ctx.dtype, ctx.device)
                if not math.isfinite(v):
                    raise numerical_error(job, [ctx.sources[i]], overflow_reason(ctx.dtype))
                if ctx.cache is not None:
                    ctx.cache.put_norm(ck, v)
            out.setdefault(job.key, []).append((i, v))
    return out
