"""DO-Merging: orthogonalize + decouple + task-arithmetic directions (arXiv 2505.15875; method.md)."""
from __future__ import annotations

from .common import LAM
from .registry import MethodSpec, register
from .ta import task_arithmetic

SPEC = register(MethodSpec(
    name="do", label="DO-Merging",
    description="Decouple and Orthogonalize: orthogonalize the LoRAs' factors, merge column "
                "magnitudes and unit directions separately (directions by task arithmetic), recombine. "
                "Exact low rank.",
    params=(LAM,), fn=task_arithmetic, lowrank=True, linear=True,
    defaults_override={"decouple": True, "orthogonalize": True}))
