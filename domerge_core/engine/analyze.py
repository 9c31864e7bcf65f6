"""Diagnostics without merging (``domerge inspect``, the panel's plots), through the same stages
as `merge`: plan → prepare (with the orthogonalization on) → the report's summary, plus the exact
spectrum of the task-arithmetic merge per module (how much a truncation to the largest input rank
would keep)."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch

from ..algebra.linalg import exact_svd
from ..devices import resolve_device
from ..report.diagnostics import lora_name, summarize
from .combine import strengths
from .context import RunContext
from .numerics import locate_linalg_failure
from .plan import batch_jobs, check_weights, input_tags, load_inputs, plan_modules, sources
from .prepare import inactive_norms, load_stack, prepare

ORTH_PARAMS = ("orth_steps", "orth_lr", "orth_gamma", "orth_optimizer", "balanced")


def _spectrum(batch, ctx: RunContext):
    """(energy kept at the largest input rank, rank for 99 % energy) per module of the batch, for
    the task-arithmetic merge at the given strengths (original factors)."""
    B, A, ranks = load_stack(batch, ctx.dtype, ctx.device)
    W = strengths(batch, ctx)
    per_row = torch.cat([W[:, t:t + 1].expand(-1, r) for t, r in enumerate(ranks)], 1)
    _, S, _ = exact_svd(B * per_row.unsqueeze(-2), A)
    e2 = S.double() ** 2
    cum = torch.cumsum(e2, -1) / e2.sum(-1).clamp_min(1e-300).unsqueeze(-1)
    kept = cum[..., min(max(ranks), S.shape[-1]) - 1].tolist()
    return kept, ((cum < 0.99).sum(-1) + 1).tolist()


def analyze(loras, weights: Optional[Sequence[float]] = None, orthogonalize_params: Optional[Dict[str, Any]] = None,
            device: str = "auto", compute_dtype: torch.dtype = torch.float32, spectrum: bool = True,
            per_module: bool = False) -> Dict[str, Any]:
    """Diagnostics of a set of LoRAs (objects or paths) without merging: norms, magnitude
    variance, cosines before/after the orthogonalization (``orthogonalize_params``: ``orth_*`` and
    ``balanced`` values; default ``do``'s), ‖δ‖ ratios, ranks and truncation energy."""
    from ..methods import get_method
    spec = get_method("do")
    loras = load_inputs(loras)
    w = check_weights(weights, len(loras))
    p = spec.resolve(orthogonalize_params or {})
    p["orthogonalize"] = True
    ctx = RunContext(spec, p, resolve_device(device), compute_dtype, sources(loras), input_tags(loras))
    jobs = plan_modules(loras, w)
    records: Dict[str, Dict[str, Any]] = {}
    kept_all: List[float] = []
    rank99: List[int] = []

    def run(batch):
        pre = prepare(batch, ctx)
        stats = dict(pre.stat_lists())
        if pre.tasks == 1:
            N = len(batch)
            stats.update({"cos_before": [[[1.0]]] * N, "cos_after": [[[1.0]]] * N,
                          "rel_delta_A": [[0.0]] * N, "rel_delta_B": [[0.0]] * N})
        return stats, (_spectrum(batch, ctx) if spectrum and pre.tasks > 1 else None)

    for batch in batch_jobs(jobs, torch.empty((), dtype=compute_dtype).element_size(), dense=False):
        try:
            stats, spec_out = run(batch)
        except torch.linalg.LinAlgError as e:
            raise locate_linalg_failure(e, batch, ctx.sources, ctx.dtype, ctx.device, rerun=run) from e
        ranks = [mod.rank for _, mod in batch[0].active]
        for j, job in enumerate(batch):
            rec = {"inputs": list(job.inputs), "ranks": ranks, **{k: v[j] for k, v in stats.items()}}
            if spec_out is not None:
                kept, r99 = spec_out
                rec["energy_kept_at_max_rank"] = kept[j]
                rec["rank_for_99pct_energy"] = int(r99[j])
                kept_all.append(kept[j])
                rank99.append(int(r99[j]))
            records[job.key] = rec
    names = [lora_name(l, i) for i, l in enumerate(loras)]
    out = summarize(records, names, w, extra_norms=inactive_norms(jobs, ctx))
    for i, l in enumerate(loras):
        rk = [m.rank for m in l]
        out["loras"][i].update({"modules": len(l), "rank_min": min(rk) if rk else 0,
                                "rank_max": max(rk) if rk else 0, "format": l.format,
                                "base_model": l.base_model})
    out["orthogonalize_params"] = {k: p[k] for k in ORTH_PARAMS}
    out["modules_total"] = len(jobs)
    out["modules_shared"] = sum(1 for j in jobs if len(j.active) >= 2)
    if spectrum and kept_all:
        out["truncation"] = {
            "energy_kept_at_max_rank_mean": sum(kept_all) / len(kept_all),
            "energy_kept_at_max_rank_min": min(kept_all),
            "rank_for_99pct_energy_mean": sum(rank99) / len(rank99),
            "rank_for_99pct_energy_max": max(rank99),
        }
    if per_module:
        out["modules"] = records
    return out
