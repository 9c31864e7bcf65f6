"""Task arithmetic: ``Σ_i w_i ΔW_i`` (times λ in the door) — exact, rank Σr_i, never dense."""
from __future__ import annotations

from .base import LowRankUpdate, MethodContext, TaskSet, stacked
from .common import LAM
from .registry import MethodSpec, register


def task_arithmetic(tasks: TaskSet, params: dict, ctx: MethodContext) -> LowRankUpdate:
    return stacked(tasks)


SPEC = register(MethodSpec(
    name="ta", label="Task arithmetic",
    description="Sum of the LoRAs' updates at their strengths (what chained LoRA loaders apply), "
                "exact at rank Σ ranks.",
    params=(LAM,), fn=task_arithmetic, lowrank=True, linear=True))
