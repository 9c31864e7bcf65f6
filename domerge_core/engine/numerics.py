"""Numerical failures as `NumericalError`s that name the input file(s) and the module key.

A torch ``LinAlgError``, non-finite factors, or factors whose update norm overflows the compute
dtype never surface as bare torch exceptions. The checks read only r×r-sized statistics that the
stages compute anyway (norms, cosines, ‖δ‖ ratios), so they cost nothing on the happy path; the
culprit input is then found by checking each one alone.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Sequence

import torch

from ..algebra.linalg import frob_norm
from ..errors import NumericalError
from .plan import ModuleJob


def numerical_error(job: ModuleJob, files: Sequence[str], reason: str) -> NumericalError:
    files = list(dict.fromkeys(files))
    return NumericalError(f"module {job.key}: {reason}", file=", ".join(files) or None,
                          key=job.first.source_name or job.key)


def overflow_reason(dtype: torch.dtype) -> str:
    hint = "" if dtype == torch.float64 else ", or merge with compute_dtype=torch.float64"
    return (f"its factors are not finite, or too large for {str(dtype).replace('torch.', '')} "
            f"computation (‖ΔW‖ overflows); check the file{hint}")


def update_norm(mod, dtype: torch.dtype, device) -> float:
    """‖ΔW‖_F of one module at strength 1, from its r×r Grams."""
    up, down = mod.factors(dtype, device)
    return abs(float(mod.scale)) * float(frob_norm(up, down))


def bad_input(job: ModuleJob, sources: Sequence[str], dtype, device) -> Optional[NumericalError]:
    """The error for the first active input of ``job`` whose update norm, computed alone, is not
    finite (its factors are non-finite or overflow the compute dtype), else None."""
    for i, mod in job.active:
        if not math.isfinite(update_norm(mod, dtype, device)):
            return numerical_error(job, [sources[i]], overflow_reason(dtype))
    return None


def check_finite_stats(batch: Sequence[ModuleJob], stats: Dict[str, torch.Tensor], sources: Sequence[str],
                       dtype, device) -> None:
    """Raise `NumericalError` when a per-module statistic of a batch is not finite. A non-finite
    or overflowing factor always shows up in its module's norms (a stacked product mixes the
    inputs: 0·inf is NaN, so the input is found by checking each alone)."""
    flat = torch.cat([v.reshape(v.shape[0], -1) for v in stats.values()], -1)
    bad = ~torch.isfinite(flat).all(-1)
    if not bool(bad.any()):
        return
    job = batch[int(bad.nonzero()[0, 0])]
    raise (bad_input(job, sources, dtype, device) or
           numerical_error(job, [sources[i] for i, _ in job.active],
                           "non-finite values in the orthogonalization (extreme factor values?)"))


def locate_linalg_failure(err: BaseException, batch: Sequence[ModuleJob], sources: Sequence[str], dtype,
                          device, rerun: Optional[Callable] = None) -> NumericalError:
    """A `NumericalError` for a torch ``LinAlgError`` raised while processing ``batch``: the input
    whose factors are non-finite or overflow the compute dtype, else the module that fails when
    ``rerun([job])`` runs it alone, else the batch's first module."""
    for job in batch:
        hit = bad_input(job, sources, dtype, device)
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
    return numerical_error(culprit, [sources[i] for i, _ in culprit.active],
                           f"a linear-algebra step failed ({msg}); the factors may hold extreme values")
