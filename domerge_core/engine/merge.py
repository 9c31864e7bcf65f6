"""The one door every adapter uses: ``merge(inputs, method, params, ...) -> MergeResult``.

Per module (method.md), through the stages of this package: plan (inputs, strengths, module jobs,
batches of equal shape) → prepare (strength-free and cacheable: the format scale folded into
``up``, [balanced form + orthogonalize], statistics) → combine (strengths → [decouple] → the
method → [recombine] → ×λ → exact factors at rank Σr, or truncated to rank / energy) → result.
A module with one active input passes through as ``λ·w·ΔW``.

The low-rank path (``ta``, ``do``, any method with ``lowrank=True``) never builds an m×n matrix;
``ties``/``dare`` materialise a bounded chunk of modules at a time. Numerical failures surface as
`NumericalError` naming the file(s) and module, never as a bare torch exception.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import torch

from ..devices import resolve_device, supports_float64
from ..errors import InvalidParameterError
from ..progress import ProgressFn
from .cache import MergeCache
from .combine import combine
from .context import RunContext
from .numerics import locate_linalg_failure
from .plan import (LoraLike, Multiplier, batch_jobs, check_compatible, check_multipliers, check_run_options,
                   check_weights, input_tags, load_inputs, plan_modules, sources)
from .prepare import inactive_norms, prepare
from .result import Collector, MergeResult, merged_lora

__all__ = ["merge", "MergeResult"]


def check_compute(compute_dtype, device) -> None:
    if compute_dtype not in (torch.float32, torch.float64):
        raise InvalidParameterError(f"compute_dtype must be torch.float32 or torch.float64, not {compute_dtype}")
    if compute_dtype == torch.float64 and not supports_float64(device):
        raise InvalidParameterError(f"float64 compute is not supported on {device}")


def merge(inputs: Sequence[LoraLike], method: Optional[str] = None, params: Optional[Dict[str, Any]] = None, *,
          weights: Optional[Sequence[float]] = None, rank: Optional[int] = None,
          energy: Optional[float] = None, device: str = "auto",
          compute_dtype: torch.dtype = torch.float32, seed: int = 0,
          progress: Optional[ProgressFn] = None, cache: Optional[MergeCache] = None,
          multipliers: Optional[Sequence[Multiplier]] = None, base=None) -> MergeResult:
    """Merge LoRAs (objects or safetensors paths) with a registered method.

    ``weights``: user strengths (default 1.0 each); ``multipliers``: per input, None or a function
    of the canonical module key giving a factor on that input's strength for that module (block
    weights, a CLIP strength; 0 leaves the input out of the module); ``rank``/``energy``: truncate
    every module to that rank / kept energy fraction (exact Eckart–Young for low-rank methods),
    else low-rank methods are written exactly at rank Σr_i and dense ones at rank Σr_i (or exactly
    when that is ≥ min(m, n)); ``seed``: DARE's draws; ``progress(done, total, stage)`` per module
    with stages "orthogonalize", "merge", "truncate" — raising from it cancels (nothing is
    written); ``cache``: a `MergeCache` reused across calls (sliders); ``base``: the base model that
    inputs given as paths read against when their update depends on it (DoRA, OFT, BOFT, GLoRA): a
    diffusers pipeline, ``{component: module}``, a checkpoint path or ``fn(key, name)``.

    Raises `DomergeError` subclasses only (for the inputs' numbers: `NumericalError`, naming the
    file(s) and the module key).
    """
    from ..methods import default_method, get_method
    spec = get_method(default_method() if method is None else method)
    p = spec.resolve(params)
    rank, energy, seed = check_run_options(rank, energy, seed)
    loras = load_inputs(inputs, base)
    check_compatible(loras)
    w = check_weights(weights, len(loras))
    mult = check_multipliers(multipliers, len(loras))
    dev = resolve_device(device)
    check_compute(compute_dtype, dev)
    jobs = plan_modules(loras, w, mult)
    batches = batch_jobs(jobs, torch.empty((), dtype=compute_dtype).element_size(), dense=not spec.lowrank)
    ctx = RunContext(spec, p, dev, compute_dtype, sources(loras), input_tags(loras), rank, energy,
                     int(seed), cache, progress, total=sum(len(b) for b in batches))
    out = Collector()
    for batch in batches:
        try:
            pre = prepare(batch, ctx)
            out.add(batch, combine(batch, pre, ctx), pre)
        except torch.linalg.LinAlgError as e:
            quiet = ctx.quiet()
            raise locate_linalg_failure(e, batch, ctx.sources, ctx.dtype, ctx.device,
                                        rerun=lambda b: combine(b, prepare(b, quiet), quiet)) from e
    from ..report.diagnostics import merge_report
    rep = merge_report(loras, w, spec.name, p, out.records, jobs, rank=rank, energy=energy,
                       extra_norms=inactive_norms(jobs, ctx))
    return MergeResult(lora=merged_lora(jobs, out.factors, loras), method=spec.name, params=p, weights=w,
                       inputs=loras, report=rep)
