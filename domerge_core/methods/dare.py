"""DARE (Yu et al. 2023): drop random entries of each task update, rescale, then add."""
from __future__ import annotations

from .base import DenseUpdate, MethodContext, TaskSet, dare_drop
from .common import DROP_RATE, LAM, RESCALE
from .registry import MethodSpec, register


def dare(tasks: TaskSet, params: dict, ctx: MethodContext) -> DenseUpdate:
    return DenseUpdate(dare_drop(tasks, ctx, params["drop_rate"], params["rescale"]).sum(0))


SPEC = register(MethodSpec(
    name="dare", label="DARE",
    description="Drop each entry of each LoRA's update with probability drop_rate (seeded), "
                "rescale the rest, add. Dense and full rank: the written file is a truncation (error "
                "reported); knots_dare / core_dare are exact low rank.",
    params=(LAM, DROP_RATE, RESCALE), fn=dare))
