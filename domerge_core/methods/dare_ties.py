"""DARE-TIES: DARE's random drop and rescale, then TIES's sign election and disjoint mean
(PEFT ``merge_utils.dare_ties`` semantics)."""
from __future__ import annotations

from .base import DenseUpdate, MethodContext, TaskSet, dare_drop, disjoint_mean, elect_sign
from .common import DROP_RATE, LAM, RESCALE, SIGN_METHOD
from .registry import MethodSpec, register


def dare_ties(tasks: TaskSet, params: dict, ctx: MethodContext) -> DenseUpdate:
    x = dare_drop(tasks, ctx, params["drop_rate"], params["rescale"])
    return DenseUpdate(disjoint_mean(x, elect_sign(x, params["sign_method"])))


SPEC = register(MethodSpec(
    name="dare_ties", label="DARE-TIES",
    description="DARE's random drop and rescale, then TIES's sign election and disjoint mean. "
                "Dense and full rank: the written file is a truncation (error reported); "
                "knots_dare_ties / core_dare_ties are exact low rank.",
    params=(LAM, DROP_RATE, RESCALE, SIGN_METHOD), fn=dare_ties))
