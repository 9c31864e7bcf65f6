"""The one door every adapter uses: ``merge(inputs, method, params, ...) -> MergeResult``.

Per module (method.md): fold the format scale into ``up``; drop inputs at strength 0; if one input
is left, pass it through as ``λ·w·ΔW``; otherwise, on batches of modules of equal shape on the
device: [balanced form +] [orthogonalize] (strength-free, cacheable) → apply strengths →
[decouple into magnitudes and directions] → the method combines the tasks → [recombine] → ×λ →
write exactly (low-rank methods: stacked factors, rank Σr_i) or truncate (rank / energy).

The low-rank path (``ta``, ``do``, any method with ``lowrank=True``) never builds an m×n matrix;
``ties``/``dare`` materialise a bounded chunk of modules at a time.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from .cache import MergeCache
from .decouple import (direction_down, direction_weights, magnitudes, merge_magnitudes, recombine_dense,
                       recombine_lowrank, split_blocks)
from .devices import resolve_device, supports_float64
from .errors import IncompatibleLorasError, InvalidParameterError
from .linalg import (_qr, _svd, block_indicator, block_inner_products_from_grams, cosine_from_inner, mT,
                     relative_tail_error, split_sqrt, truncate)
from .lora import Lora, LoraModule
from .orthogonalize import OrthOptions, orthogonalize
from .progress import ProgressFn, report

LoraLike = Union[Lora, str, "os.PathLike[str]"]

LOWRANK_BATCH_BYTES = 128 << 20      # stacked factors of one low-rank batch
DENSE_BATCH_BYTES = 256 << 20        # dense task matrices of one ties/dare chunk
DENSE_EXACT_SVD_MAX = 512            # min(m, n) up to which a dense module gets a full SVD
STAT_NAMES = ("cos_before", "cos_after", "rel_delta_A", "rel_delta_B", "norms", "norms_after")
TENSOR_NAMES = STAT_NAMES + ("B", "A", "GB")


@dataclass
class MergeResult:
    lora: Lora                               # merged modules (scale 1.0, canonical keys), format "merged"
    method: str
    params: Dict[str, Any]                   # resolved parameters (defaults filled in)
    weights: List[float]                     # user strengths, one per input
    inputs: List[Lora]
    report: Dict[str, Any] = field(default_factory=dict)   # diagnostics, JSON-serialisable

    def _metadata(self) -> Dict[str, str]:
        from .metadata import output_metadata
        return output_metadata(self.inputs, weights=self.weights, method=self.method, params=self.params,
                               rank_info=self.lora)

    def state_dict(self, format: Optional[str] = None, dtype: Optional[torch.dtype] = None
                   ) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
        """(tensors, metadata) in a file layout (default: the first input's), for diffusers'
        ``load_lora_weights``, ComfyUI's LORA_MODEL, or a writer. ``dtype`` defaults to the first
        input's dtype."""
        from .formats import to_state_dict
        return to_state_dict(self.lora, format, dtype=dtype, metadata=self._metadata())

    def save(self, path: str, format: Optional[str] = None, dtype: Optional[torch.dtype] = None,
             overwrite: bool = False) -> str:
        """Write atomically; refuses to replace an existing file unless ``overwrite`` (and never
        writes over an input)."""
        from .formats import save_lora
        return save_lora(self.lora, path, format=format, dtype=dtype, metadata=self._metadata(),
                         overwrite=overwrite, inputs=[l.source for l in self.inputs if l.source])


# --------------------------------------------------------------------------------------------
# planning: which inputs provide which module, batched by shape

@dataclass
class ModuleJob:
    key: str
    present: List[Tuple[int, LoraModule]]     # inputs that have the module (any strength)
    active: List[Tuple[int, LoraModule]]      # those with a non-zero strength

    @property
    def first(self) -> LoraModule:
        return self.present[0][1]


def _load_inputs(inputs: Sequence[LoraLike]) -> List[Lora]:
    if isinstance(inputs, (str, os.PathLike, Lora)):
        inputs = [inputs]
    out = []
    for x in inputs:
        if isinstance(x, Lora):
            out.append(x)
        elif isinstance(x, (str, os.PathLike)):
            from .formats import load_lora
            out.append(load_lora(os.fspath(x)))
        else:
            raise InvalidParameterError(f"merge input must be a Lora or a file path, not {type(x).__name__}")
    if not out:
        raise InvalidParameterError("merge needs at least one input LoRA")
    return out


def input_tags(loras: Sequence[Lora]) -> List[str]:
    """Stable per-input names for random seeds: file name, ``#n`` for the n-th repeat."""
    seen: Dict[str, int] = {}
    out = []
    for lora in loras:
        name = lora.name or lora.source or "<memory>"
        n = seen.get(name, 0)
        seen[name] = n + 1
        out.append(name if n == 0 else f"{name}#{n}")
    return out


def _check_weights(weights: Optional[Sequence[float]], n: int) -> List[float]:
    if weights is None:
        return [1.0] * n
    w = [float(x) for x in weights]
    if len(w) != n:
        raise InvalidParameterError(f"{len(w)} weights given for {n} input LoRAs")
    for x in w:
        if not math.isfinite(x):
            raise InvalidParameterError(f"weight {x} is not finite")
    return w


def plan_modules(loras: Sequence[Lora], weights: Sequence[float]) -> List[ModuleJob]:
    """Union of the inputs' module keys in first-seen order, with shape checks."""
    jobs: Dict[str, ModuleJob] = {}
    for i, lora in enumerate(loras):
        for key, mod in lora.modules.items():
            job = jobs.get(key)
            if job is None:
                job = jobs[key] = ModuleJob(key, [], [])
            else:
                ref_i, ref = job.present[0]
                if (ref.out_features, ref.in_features) != (mod.out_features, mod.in_features) or \
                        (ref.kernel_size or None) != (mod.kernel_size or None):
                    raise IncompatibleLorasError(
                        f"module {key}: shape {ref.weight_shape} in {loras[ref_i].source} but "
                        f"{mod.weight_shape} here (LoRAs for different base models?)",
                        file=lora.source, key=mod.source_name or key)
            job.present.append((i, mod))
            if weights[i] != 0.0:
                job.active.append((i, mod))
    return list(jobs.values())


def _signature(job: ModuleJob) -> Tuple:
    m = job.first
    return (m.out_features, m.in_features, tuple(m.kernel_size or ()),
            tuple(i for i, _ in job.active), tuple(mod.rank for _, mod in job.active))


def batch_jobs(jobs: Sequence[ModuleJob], elem_bytes: int, dense: bool) -> List[List[ModuleJob]]:
    """Group jobs of equal signature, in first-seen order, chunked to a memory budget."""
    groups: Dict[Tuple, List[ModuleJob]] = {}
    for job in jobs:
        if job.active:
            groups.setdefault(_signature(job), []).append(job)
    out = []
    for sig, js in groups.items():
        m, n, _, idx, ranks = sig
        R = sum(ranks)
        per = (m + n) * R * elem_bytes * 4
        if dense and len(idx) > 1:
            per = max(per, (len(idx) + 2) * m * n * elem_bytes)
        budget = DENSE_BATCH_BYTES if dense else LOWRANK_BATCH_BYTES
        size = max(1, budget // max(per, 1))
        for s in range(0, len(js), size):
            out.append(js[s:s + size])
    return out


# --------------------------------------------------------------------------------------------
# strength-free preparation (cacheable)

def orth_options(params: Dict[str, Any]) -> OrthOptions:
    return OrthOptions(steps=int(params["orth_steps"]), lr=float(params["orth_lr"]),
                       gamma=float(params["orth_gamma"]), optimizer=str(params["orth_optimizer"]),
                       balanced=bool(params["balanced"]))


def _cache_key(job: ModuleJob, dtype: torch.dtype, device: torch.device, okey) -> Tuple:
    return (job.key, tuple((i, id(mod)) for i, mod in job.active), str(dtype), str(device), okey)


def _load_stack(batch: Sequence[ModuleJob], dtype, device) -> Tuple[torch.Tensor, torch.Tensor, List[int]]:
    """Stacked factors of the active inputs, format scale folded into up: (N,m,R), (N,R,n), ranks.
    Written straight into preallocated tensors (one conversion copy per factor)."""
    ranks = [mod.rank for _, mod in batch[0].active]
    first = batch[0].first
    N, m, n, R = len(batch), first.out_features, first.in_features, sum(ranks)
    B = torch.empty(N, m, R, dtype=dtype, device=device)
    A = torch.empty(N, R, n, dtype=dtype, device=device)
    scales = torch.empty(N, R, dtype=dtype)
    for j, job in enumerate(batch):
        o = 0
        for _, mod in job.active:
            up, down = mod.loader()
            r = mod.rank
            B[j, :, o:o + r].copy_(up.reshape(m, r))
            A[j, o:o + r, :].copy_(down.reshape(r, n))
            scales[j, o:o + r] = float(mod.scale)
            o += r
    B.mul_(scales.to(device).unsqueeze(-2))
    return B, A, ranks


def prepare_batch(batch: Sequence[ModuleJob], params: Dict[str, Any], dtype, device,
                  cache: Optional[MergeCache] = None, progress: Optional[ProgressFn] = None,
                  counters: Optional[Dict[str, int]] = None, total: int = 0) -> Dict[str, Any]:
    """Stacked strength-free factors of a batch (T ≥ 2 active inputs) and their diagnostics:
    {"B": (N,m,R), "A": (N,R,n), "ranks", "cos_before", "cos_after", "rel_delta_A", "rel_delta_B",
    "norms" (N,T), "alpha": (N,T,n) or None}."""
    do_orth = bool(params.get("orthogonalize"))
    opts = orth_options(params)
    okey = opts.key() if do_orth else None
    keys = [_cache_key(job, dtype, device, okey) for job in batch]
    entries = [cache.get(k) for k in keys] if cache is not None else [None] * len(batch)
    if all(e is not None for e in entries):
        out = {name: torch.stack([e[name] for e in entries], 0) for name in TENSOR_NAMES}
        out["ranks"] = entries[0]["ranks"]
        out["alpha"] = (torch.stack([e["alpha"] for e in entries], 0)
                        if all(e.get("alpha") is not None for e in entries) else None)
        out["_entries"] = entries
        if do_orth:
            _tick(progress, counters, "orthogonalize", len(batch), total)
        return out
    B, A, ranks = _load_stack(batch, dtype, device)
    if do_orth:
        res = orthogonalize(B, A, ranks, opts)
        out = {"B": res.B, "A": res.A, "cos_before": res.cos_before, "cos_after": res.cos_after,
               "rel_delta_A": res.rel_delta_A, "rel_delta_B": res.rel_delta_B,
               "norms": res.norms_before, "norms_after": res.norms_after, "GB": res.GB}
        _tick(progress, counters, "orthogonalize", len(batch), total)
    else:
        GB = mT(B) @ B
        K = block_inner_products_from_grams(GB, A @ mT(A), ranks)
        cos = cosine_from_inner(K)
        z = torch.zeros(B.shape[0], len(ranks), dtype=B.dtype, device=B.device)
        nrm = torch.diagonal(K, dim1=-2, dim2=-1).clamp_min(0).sqrt()
        out = {"B": B, "A": A, "cos_before": cos, "cos_after": cos, "rel_delta_A": z, "rel_delta_B": z,
               "norms": nrm, "norms_after": nrm, "GB": GB}
    out["ranks"] = ranks
    out["alpha"] = None
    if cache is not None:
        entries = []
        for j, k in enumerate(keys):
            e = {name: out[name][j] for name in TENSOR_NAMES}
            e["ranks"] = ranks
            e["alpha"] = None
            e["_refs"] = [mod for _, mod in batch[j].active]
            cache.put(k, e)
            entries.append(e)
        out["_entries"] = entries
    return out


def _tick(progress, counters, stage, n, total):
    if progress is None or counters is None:
        return
    for _ in range(n):
        counters[stage] = counters.get(stage, 0) + 1
        report(progress, counters[stage], total, stage)


# --------------------------------------------------------------------------------------------
# output factorisation

def _dense_factorize(D: torch.Tensor, rank: int, energy: Optional[float], seed: int = 0
                     ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Factor dense updates (N,m,n) at ≤ ``rank`` (and ``energy``): exact when rank ≥ min(m,n)
    and no energy target; a full SVD for small modules; else a seeded randomized SVD (range finder
    with 4 power iterations). The reported error is exact for the factors returned."""
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
    if energy is not None:
        # energy relative to the whole update (also when the randomized SVD saw only q values)
        e2 = S.double() ** 2
        frac = torch.cumsum(e2, -1) / total.unsqueeze(-1).clamp_min(1e-300)
        ks = ((frac < (float(energy) - 1e-12)).sum(-1) + 1).clamp(max=min(rank, S.shape[-1]))
    else:
        ks = torch.full((N,), min(rank, S.shape[-1]), dtype=torch.long, device=D.device)
    kmax = int(ks.max())
    up, down = split_sqrt(U, S, Vh, kmax)
    if int(ks.min()) < kmax:
        keep = (torch.arange(kmax, device=D.device) < ks.unsqueeze(-1)).to(up.dtype)
        up, down = up * keep.unsqueeze(-2), down * keep.unsqueeze(-1)
    return up, down, ks, relative_tail_error(S, ks, total)


# --------------------------------------------------------------------------------------------
# the door

def _validate(rank, energy, compute_dtype, device):
    if rank is not None:
        if int(rank) != rank or int(rank) < 1:
            raise InvalidParameterError(f"rank must be a positive integer, not {rank!r}")
        rank = int(rank)
    if energy is not None:
        energy = float(energy)
        if not (0.0 < energy <= 1.0):
            raise InvalidParameterError(f"energy must be in (0, 1], not {energy}")
    if compute_dtype not in (torch.float32, torch.float64):
        raise InvalidParameterError(f"compute_dtype must be torch.float32 or torch.float64, not {compute_dtype}")
    if compute_dtype == torch.float64 and not supports_float64(device):
        raise InvalidParameterError(f"float64 compute is not supported on {device}")
    return rank, energy


def merge(inputs: Sequence[LoraLike], method: str = "do", params: Optional[Dict[str, Any]] = None, *,
          weights: Optional[Sequence[float]] = None, rank: Optional[int] = None,
          energy: Optional[float] = None, device: str = "auto",
          compute_dtype: torch.dtype = torch.float32, seed: int = 0,
          progress: Optional[ProgressFn] = None, cache: Optional[MergeCache] = None) -> MergeResult:
    """Merge LoRAs (objects or safetensors paths) with a registered method.

    ``weights``: user strengths (default 1.0 each); ``rank``/``energy``: truncate every module to
    that rank / kept energy fraction (exact Eckart–Young for low-rank methods), else low-rank
    methods are written exactly at rank Σr_i and dense ones at rank Σr_i (or exactly when that is
    ≥ min(m, n)); ``seed``: DARE's draws; ``progress(done, total, stage)`` per module with stages
    "orthogonalize", "merge", "truncate" — raising from it cancels (nothing is written);
    ``cache``: a `MergeCache` reused across calls (sliders).
    """
    from .align import check_compatible
    from .methods import get_method
    spec = get_method(method)
    p = spec.resolve(params)
    loras = _load_inputs(inputs)
    check_compatible(loras)            # different base models, the same file twice
    w = _check_weights(weights, len(loras))
    dev = resolve_device(device)
    rank, energy = _validate(rank, energy, compute_dtype, dev)
    dtype = compute_dtype
    elem = torch.empty((), dtype=dtype).element_size()
    jobs = plan_modules(loras, w)
    batches = batch_jobs(jobs, elem, dense=not spec.lowrank)
    total = sum(len(b) for b in batches)
    counters: Dict[str, int] = {}
    truncating = rank is not None or energy is not None
    lam = float(p.get("lam", 1.0))
    from .methods.base import DenseUpdate, LowRankUpdate, MethodContext, TaskSet
    ctx = MethodContext(seed=int(seed), device=dev, dtype=dtype)
    tags = input_tags(loras)

    out_factors: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}
    records: Dict[str, Dict[str, Any]] = {}
    for batch in batches:
        keys = [j.key for j in batch]
        idx = [i for i, _ in batch[0].active]
        wv = torch.tensor([w[i] for i in idx], dtype=dtype, device=dev)
        N = len(batch)
        if len(idx) == 1:
            # one active input: every method is the identity, λ·w·ΔW exactly
            B, A, ranks = _load_stack(batch, dtype, dev)
            upd = LowRankUpdate(B.mul_(lam * wv[0]), A)
            pre = None
        else:
            pre = prepare_batch(batch, p, dtype, dev, cache, progress, counters, total)
            ranks = pre["ranks"]
            Bh, Ah = pre["B"], pre["A"]                       # may be cached: never modified in place
            E = block_indicator(ranks, dev, dtype)            # R×T
            if p["decouple"]:
                alpha = pre["alpha"]
                if alpha is None:
                    Bs, As = split_blocks(Bh, Ah, ranks)
                    alpha = magnitudes(Bs, As, GB=pre["GB"])
                    for j, e in enumerate(pre.get("_entries") or []):
                        e["alpha"] = alpha[j]
                up_in = Bh * (E @ direction_weights(wv)).unsqueeze(-2)
                down_in = direction_down(Ah, alpha, ranks)
                alpha_star = merge_magnitudes(alpha, wv, p["magnitude"])
            else:
                up_in = Bh * (E @ wv).unsqueeze(-2)
                down_in = Ah
            upd = spec.fn(TaskSet(up_in, down_in, list(ranks), keys, idx, [tags[i] for i in idx]), p, ctx)
            if isinstance(upd, LowRankUpdate):
                if p["decouple"]:
                    up, down = recombine_lowrank(upd.up, upd.down, alpha_star, p["recombine"], lam,
                                                 inplace=upd.down is down_in)
                elif lam != 1.0:
                    up, down = (upd.up.mul_(lam) if upd.up is up_in else upd.up * lam), upd.down
                else:
                    up, down = upd.up, upd.down
                upd = LowRankUpdate(up, down)
            elif isinstance(upd, DenseUpdate):
                D = upd.delta
                D = recombine_dense(D, alpha_star, p["recombine"], lam) if p["decouple"] else D * lam
                upd = DenseUpdate(D)
            else:
                raise TypeError(f"method {spec.name!r} returned {type(upd).__name__}")
        _tick(progress, counters, "merge", N, total)

        if isinstance(upd, LowRankUpdate):
            if truncating:
                up, down, ks, err = truncate(upd.up, upd.down, rank, energy)
                _tick(progress, counters, "truncate", N, total)
            else:
                up, down = upd.up, upd.down
                ks = torch.full((N,), up.shape[-1], dtype=torch.long)
                err = torch.zeros(N, dtype=torch.float64)
        else:
            target = rank if rank is not None else sum(ranks)
            up, down, ks, err = _dense_factorize(upd.delta, target, energy, seed)
            _tick(progress, counters, "truncate", N, total)

        up, down = up.cpu(), down.cpu()
        ks_l, err_l = ks.tolist(), err.tolist()
        stats = None
        if pre is not None:
            stats = {name: pre[name].tolist() for name in STAT_NAMES}
        for j, job in enumerate(batch):
            k = int(ks_l[j])
            out_factors[job.key] = (up[j, :, :k].contiguous(), down[j, :k, :].contiguous())
            rec = {"inputs": idx, "rank": k, "rel_error": float(err_l[j])}
            if stats is not None:
                rec.update({name: stats[name][j] for name in stats})
            records[job.key] = rec

    modules: Dict[str, LoraModule] = {}
    for job in jobs:
        if job.key not in out_factors:
            continue
        up, down = out_factors[job.key]
        first = job.first
        modules[job.key] = LoraModule.from_tensors(job.key, up, down, 1.0, kernel_size=first.kernel_size,
                                                   source_name=first.source_name)
    first_lora = loras[0]
    layout = dict(first_lora.layout or {})
    if "format" not in layout:
        from .formats import default_format
        layout["format"] = default_format(first_lora)
    # dtype: what the writers use by default — the first input's (the factors themselves are in
    # the compute dtype, on the CPU)
    merged = Lora(modules=modules, format="merged", source="<merged>", metadata={}, dtype=first_lora.dtype,
                  base_model=first_lora.base_model, layout=layout)
    from .diagnostics import merge_report
    rep = merge_report(loras, w, spec.name, p, records, jobs, rank=rank, energy=energy)
    return MergeResult(lora=merged, method=spec.name, params=p, weights=w, inputs=loras, report=rep)
