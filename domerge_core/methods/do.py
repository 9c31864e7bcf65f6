"""DO-Merging: orthogonalize + decouple + task-arithmetic directions (arXiv 2505.15875; method.md)."""
from __future__ import annotations

from .common import LAM
from .registry import MethodSpec, register
from .ta import task_arithmetic

SPEC = register(MethodSpec(
    name="do", label="DO-Merging",
    description="Decouple and Orthogonalize: orthogonalize the LoRAs' factors, merge column "
                "magnitudes and unit directions separately (directions by task arithmetic), recombine "
                "norm-preserving (each merged column gets the merged magnitude). Exact low rank.",
    params=(LAM,), fn=task_arithmetic, lowrank=True, linear=True,
    # recombine v2 (method.md §3, norm-preserving): the merged update keeps the tasks' mean
    # magnitude at strengths 1, so drop-in merges of 3+ LoRAs no longer grow with T; best mean
    # rank on the quality benchmarks' validation cells (benchmarks/quality/RESULTS.md).
    defaults_override={"decouple": True, "orthogonalize": True, "recombine": "v2"}))
