"""The one door every adapter uses: ``merge(inputs, method, params, ...) -> MergeResult``.

Per module (method.md): fold the format scale into ``up``; drop inputs at strength 0; if one input
is left, pass it through as ``λ·w·ΔW``; otherwise, on batches of modules of equal shape on the
device: [balanced form +] [orthogonalize] (strength-free, cacheable) → apply strengths →
[decouple into magnitudes and directions] → the method combines the tasks → [recombine] → ×λ →
write exactly (low-rank methods: stacked factors, rank Σr_i) or truncate (rank / energy).

The low-rank path (``ta``, ``do``, any method with ``lowrank=True``) never builds an m×n matrix;
``ties``/``dare`` materialise a bounded chunk of modules at a time.

With a `MergeCache`, everything strength-free is kept per batch, stacked (factors, Grams, decouple
magnitudes, diagnostics, even their Python lists), so a warm re-merge (a slider move) does only the
strength-dependent work: one pass over the smaller factor (``ta``) or over the direction's down
factor (``do``), the magnitude merge, and the report. Results are bit-identical to a cold merge.

Numerical failures (a torch ``LinAlgError``; non-finite factors; factors whose update norm overflows
the compute dtype) surface as `NumericalError`, a `DomergeError` naming the input file(s) and the
module key, never as a bare torch exception.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from .cache import MergeCache
from ..algebra.decouple import (direction_down, direction_weights, magnitudes, merge_magnitudes, recombine_dense,
                       recombine_lowrank, split_blocks)
from ..devices import resolve_device, supports_float64
from ..errors import DomergeError, IncompatibleLorasError, InvalidParameterError, NumericalError
from ..algebra.linalg import (_qr, _svd, block_indicator, block_inner_products_from_grams, cosine_from_inner, frob_norm,
                     mT, relative_tail_error, split_sqrt, truncate)
from ..lora import Lora, LoraModule
from ..algebra.orthogonalize import OrthOptions, orthogonalize
from ..progress import ProgressFn, report

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
        from ..metadata import output_metadata
        return output_metadata(self.inputs, weights=self.weights, method=self.method, params=self.params,
                               rank_info=self.lora)

    def state_dict(self, format: Optional[str] = None, dtype: Optional[torch.dtype] = None
                   ) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
        """(tensors, metadata) in a file layout (default: the first input's), for diffusers'
        ``load_lora_weights``, ComfyUI's LORA_MODEL, or a writer. ``dtype`` defaults to the first
        input's dtype."""
        from ..formats import to_state_dict
        return to_state_dict(self.lora, format, dtype=dtype, metadata=self._metadata())

    def save(self, path: str, format: Optional[str] = None, dtype: Optional[torch.dtype] = None,
             overwrite: bool = False) -> str:
        """Write atomically; refuses to replace an existing file unless ``overwrite`` (and never
        writes over an input)."""
        from ..formats import save_lora
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
            from ..formats import load_lora
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
# numerical failures

def _sources(loras: Sequence[Lora]) -> List[str]:
    return [l.source or f"input {i}" for i, l in enumerate(loras)]


def _numerical(job: ModuleJob, files: Sequence[str], reason: str) -> NumericalError:
    files = list(dict.fromkeys(files))
    return NumericalError(f"module {job.key}: {reason}", file=", ".join(files) or None,
                          key=job.first.source_name or job.key)


def _overflow_reason(dtype) -> str:
    hint = "" if dtype == torch.float64 else ", or merge with compute_dtype=torch.float64"
    return (f"its factors are not finite, or too large for {str(dtype).replace('torch.', '')} "
            f"computation (‖ΔW‖ overflows); check the file{hint}")


def _bad_input(job: ModuleJob, sources: Sequence[str], dtype, device) -> Optional[NumericalError]:
    """The error for the first active input of ``job`` whose update norm, computed alone, is not
    finite (its factors are non-finite or overflow the compute dtype), else None."""
    for i, mod in job.active:
        up, down = mod.factors(dtype, device)
        if not math.isfinite(abs(float(mod.scale)) * float(frob_norm(up, down))):
            return _numerical(job, [sources[i]], _overflow_reason(dtype))
    return None


def check_finite_stats(batch: Sequence[ModuleJob], stats: Dict[str, torch.Tensor], sources: Sequence[str],
                       dtype, device) -> None:
    """Raise `NumericalError` (naming the file and the module) when a per-module statistic of a
    batch (norms, cosines, ‖δ‖ ratios: r×r-sized, so the check is free) is not finite. A
    non-finite or overflowing factor always shows up in its module's norms; the input is then
    found by checking each one alone (a stacked product mixes the inputs: 0·inf is NaN)."""
    flat = torch.cat([v.reshape(v.shape[0], -1) for v in stats.values()], -1)
    bad = ~torch.isfinite(flat).all(-1)
    if not bool(bad.any()):
        return
    job = batch[int(bad.nonzero()[0, 0])]
    raise (_bad_input(job, sources, dtype, device) or
           _numerical(job, [sources[i] for i, _ in job.active],
                      "non-finite values in the orthogonalization (extreme factor values?)"))


def locate_linalg_failure(err: BaseException, batch: Sequence[ModuleJob], sources: Sequence[str], dtype,
                          device, rerun=None) -> NumericalError:
    """A `NumericalError` for a torch ``LinAlgError`` raised while processing ``batch``: the input
    whose factors are non-finite or overflow the compute dtype, else the module that fails when
    ``rerun([job])`` runs it alone, else the batch's first module."""
    for job in batch:
        hit = _bad_input(job, sources, dtype, device)
        if hit is not None:
            return hit
    culprit = batch[0]
    if rerun is not None and len(batch) > 1:
        for job in batch:
            try:
                rerun([job])
            except torch.linalg.LinAlgError:
                culprit = job
                break
    msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return _numerical(culprit, [sources[i] for i, _ in culprit.active],
                      f"a linear-algebra step failed ({msg}); the factors may hold extreme values")


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


def prepare_single(batch: Sequence[ModuleJob], dtype, device, cache: Optional[MergeCache] = None,
                   sources: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Stacked strength-free factors of a batch with one active input, and their norms (N, 1):
    {"B", "A", "ranks", "norms"}. Cached whole (a warm re-merge reads nothing); never modify the
    tensors in place."""
    keys = [_cache_key(job, dtype, device, "single") for job in batch]
    bkey = ("single",) + tuple(keys)
    if cache is not None:
        hit = cache.get_stacked(bkey)
        if hit is not None:
            return hit
    B, A, ranks = _load_stack(batch, dtype, device)
    out = {"B": B, "A": A, "ranks": ranks, "norms": frob_norm(B, A).unsqueeze(-1),
           "_refs": [mod for job in batch for _, mod in job.active]}
    check_finite_stats(batch, {"norms": out["norms"]}, sources or _default_sources(batch), dtype, device)
    if cache is not None:
        cache.put_stacked(bkey, out, keys)
    return out


def _default_sources(batch: Sequence[ModuleJob]) -> List[str]:
    n = 1 + max(i for job in batch for i, _ in job.present)
    return [f"input {i}" for i in range(n)]


def prepare_batch(batch: Sequence[ModuleJob], params: Dict[str, Any], dtype, device,
                  cache: Optional[MergeCache] = None, progress: Optional[ProgressFn] = None,
                  counters: Optional[Dict[str, int]] = None, total: int = 0,
                  sources: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Stacked strength-free factors of a batch (T ≥ 2 active inputs) and their diagnostics:
    {"B": (N,m,R), "A": (N,R,n), "ranks", "cos_before", "cos_after", "rel_delta_A", "rel_delta_B",
    "norms" (N,T), "alpha": (N,T,n) or None}.

    With a cache, the whole stacked dict is cached for the batch (keyed by its modules' keys, which
    hold the active inputs, the dtype, the device and the orthogonalization options): a warm
    re-merge gets the very same tensors back, no copy. Never modify them in place; ``alpha`` is
    filled in by the caller once and stays. When only the per-module entries are warm (the
    modules were batched differently before), they are stacked once and the stack is cached."""
    do_orth = bool(params.get("orthogonalize"))
    opts = orth_options(params)
    okey = opts.key() if do_orth else None
    sources = sources or _default_sources(batch)
    keys = [_cache_key(job, dtype, device, okey) for job in batch]
    bkey = ("batch",) + tuple(keys)
    if cache is not None:
        hit = cache.get_stacked(bkey)
        if hit is not None:
            if do_orth:
                _tick(progress, counters, "orthogonalize", len(batch), total)
            return hit
        entries = [cache.get(k) for k in keys]
        if all(e is not None for e in entries):
            out = {name: torch.stack([e[name] for e in entries], 0) for name in TENSOR_NAMES}
            out["ranks"] = entries[0]["ranks"]
            out["alpha"] = (torch.stack([e["alpha"] for e in entries], 0)
                            if all(e.get("alpha") is not None for e in entries) else None)
            for j, e in enumerate(entries):          # the entries now view the new stack
                for name in TENSOR_NAMES:
                    e[name] = out[name][j]
                if out["alpha"] is not None:
                    e["alpha"] = out["alpha"][j]
            out["_entries"] = entries
            cache.put_stacked(bkey, out, keys)
            if do_orth:
                _tick(progress, counters, "orthogonalize", len(batch), total)
            return out
    B, A, ranks = _load_stack(batch, dtype, device)
    if do_orth:
        res = orthogonalize(B, A, ranks, opts)
        out = {"B": res.B, "A": res.A, "cos_before": res.cos_before, "cos_after": res.cos_after,
               "rel_delta_A": res.rel_delta_A, "rel_delta_B": res.rel_delta_B,
               "norms": res.norms_before, "norms_after": res.norms_after, "GB": res.GB}
    else:
        GB = mT(B) @ B
        K = block_inner_products_from_grams(GB, A @ mT(A), ranks)
        cos = cosine_from_inner(K)
        z = torch.zeros(B.shape[0], len(ranks), dtype=B.dtype, device=B.device)
        nrm = torch.diagonal(K, dim1=-2, dim2=-1).clamp_min(0).sqrt()
        out = {"B": B, "A": A, "cos_before": cos, "cos_after": cos, "rel_delta_A": z, "rel_delta_B": z,
               "norms": nrm, "norms_after": nrm, "GB": GB}
    check_finite_stats(batch, {name: out[name] for name in STAT_NAMES}, sources, dtype, device)
    if do_orth:
        _tick(progress, counters, "orthogonalize", len(batch), total)
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
        cache.put_stacked(bkey, out, keys)
    return out


def inactive_norms(jobs: Sequence[ModuleJob], dtype, device, cache: Optional[MergeCache] = None,
                   sources: Optional[Sequence[str]] = None) -> Dict[str, List[Tuple[int, float]]]:
    """``‖ΔW‖_F`` (strength 1) of every module of an input at strength 0: {key: [(input, norm)]}.
    The merge leaves these inputs out, but the per-LoRA and per-block norms count every module a
    LoRA has. From r×r Grams; cached per module object."""
    out: Dict[str, List[Tuple[int, float]]] = {}
    for job in jobs:
        active = {i for i, _ in job.active}
        for i, mod in job.present:
            if i in active:
                continue
            ck = ("norm", job.key, id(mod), str(dtype), str(device))
            v = cache.get_norm(ck) if cache is not None else None
            if v is None:
                up, down = mod.factors(dtype, device)
                v = abs(float(mod.scale)) * float(frob_norm(up, down))
                if not math.isfinite(v):
                    raise _numerical(job, [(sources or _default_sources([job]))[i]], _overflow_reason(dtype))
                if cache is not None:
                    cache.put_norm(ck, mod, v)
            out.setdefault(job.key, []).append((i, v))
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

    Raises `DomergeError` subclasses only (for the inputs' numbers: `NumericalError`, naming the
    file(s) and the module key).
    """
    from ..formats.canonical import check_compatible
    from ..methods import get_method
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
    from ..methods.base import DenseUpdate, LowRankUpdate, MethodContext, TaskSet
    ctx = MethodContext(seed=int(seed), device=dev, dtype=dtype)
    tags = input_tags(loras)

    sources = _sources(loras)

    def run(batch: List[ModuleJob], cache: Optional[MergeCache], progress: Optional[ProgressFn]):
        """One batch: (up, down, ks, err, pre) with up/down on the device (N,m,k), (N,k,n)."""
        keys = [j.key for j in batch]
        idx = [i for i, _ in batch[0].active]
        wv = torch.tensor([w[i] for i in idx], dtype=dtype, device=dev)
        N = len(batch)
        # Strengths scale the smaller factor (fewer bytes per slider move); the cached factors
        # are never modified in place, so an in-place step below only touches a fresh tensor.
        first = batch[0].first
        scale_up = first.out_features <= first.in_features
        if len(idx) == 1:
            # one active input: every method is the identity, λ·w·ΔW exactly
            pre = prepare_single(batch, dtype, dev, cache, sources)
            ranks = pre["ranks"]
            s = lam * wv[0]
            upd = LowRankUpdate(pre["B"] * s, pre["A"]) if scale_up else LowRankUpdate(pre["B"], pre["A"] * s)
        else:
            pre = prepare_batch(batch, p, dtype, dev, cache, progress, counters, total, sources)
            ranks = pre["ranks"]
            Bh, Ah = pre["B"], pre["A"]                       # may be cached: never modified in place
            E = block_indicator(ranks, dev, dtype)            # R×T
            if p["decouple"]:
                alpha = pre["alpha"]
                if alpha is None:
                    Bs, As = split_blocks(Bh, Ah, ranks)
                    alpha = magnitudes(Bs, As, GB=pre["GB"])
                    pre["alpha"] = alpha
                    for j, e in enumerate(pre.get("_entries") or []):
                        e["alpha"] = alpha[j]
                # directions w_i/g · B̂_i (Â_i diag(1/α_i)): the coefficients ride on the new down
                up_in = Bh
                down_in = direction_down(Ah, alpha, ranks, direction_weights(wv))
                alpha_star = merge_magnitudes(alpha, wv, p["magnitude"])
            elif scale_up:
                up_in, down_in = Bh * (E @ wv).unsqueeze(-2), Ah
            else:
                up_in, down_in = Bh, Ah * (E @ wv).unsqueeze(-1)
            fresh = {id(t) for t in (up_in, down_in) if t is not Bh and t is not Ah}
            upd = spec.fn(TaskSet(up_in, down_in, list(ranks), keys, idx, [tags[i] for i in idx]), p, ctx)
            if isinstance(upd, LowRankUpdate):
                if p["decouple"]:
                    up, down = recombine_lowrank(upd.up, upd.down, alpha_star, p["recombine"], lam,
                                                 inplace=id(upd.down) in fresh)
                elif lam != 1.0:
                    if id(upd.down) in fresh:
                        up, down = upd.up, upd.down.mul_(lam)
                    elif id(upd.up) in fresh:
                        up, down = upd.up.mul_(lam), upd.down
                    else:
                        up, down = upd.up * lam, upd.down
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
        return up, down, ks, err, pre

    out_factors: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}
    records: Dict[str, Dict[str, Any]] = {}
    for batch in batches:
        try:
            up, down, ks, err, pre = run(batch, cache, progress)
        except torch.linalg.LinAlgError as e:
            raise locate_linalg_failure(e, batch, sources, dtype, dev,
                                        rerun=lambda b: run(b, None, None)) from e
        idx = [i for i, _ in batch[0].active]
        up, down = up.cpu(), down.cpu()
        ks_l, err_l = ks.tolist(), err.tolist()
        stats = pre.get("_lists")            # strength-free: converted once per (cached) batch
        if stats is None:
            names = STAT_NAMES if len(idx) > 1 else ("norms",)
            stats = {name: pre[name].tolist() for name in names}
            if len(idx) == 1:
                stats["norms_after"] = stats["norms"]
            pre["_lists"] = stats
        for j, job in enumerate(batch):
            k = int(ks_l[j])
            out_factors[job.key] = (up[j, :, :k].contiguous(), down[j, :k, :].contiguous())
            rec = {"inputs": idx, "rank": k, "rel_error": float(err_l[j])}
            rec.update({name: stats[name][j] for name in stats})
            records[job.key] = rec
    extra_norms = inactive_norms(jobs, dtype, dev, cache, sources)

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
        from ..formats import default_format
        layout["format"] = default_format(first_lora)
    # dtype: what the writers use by default — the first input's (the factors themselves are in
    # the compute dtype, on the CPU)
    merged = Lora(modules=modules, format="merged", source="<merged>", metadata={}, dtype=first_lora.dtype,
                  base_model=first_lora.base_model, layout=layout)
    from ..report.diagnostics import merge_report
    rep = merge_report(loras, w, spec.name, p, records, jobs, rank=rank, energy=energy,
                       extra_norms=extra_norms)
    return MergeResult(lora=merged, method=spec.name, params=p, weights=w, inputs=loras, report=rep)
