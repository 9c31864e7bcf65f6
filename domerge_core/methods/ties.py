"""TIES-merging (Yadav et al. 2023): trim each task to its largest entries, elect a sign per entry,
average the entries that agree with it (PEFT ``merge_utils.ties`` semantics, with the user
strengths applied to the tasks first so a negative strength negates a task)."""
from __future__ import annotations

from .base import DenseUpdate, MethodContext, TaskSet, disjoint_mean, elect_sign, magnitude_trim
from .common import DENSITY, LAM, SIGN_METHOD
from .registry import MethodSpec, register


def ties(tasks: TaskSet, params: dict, ctx: MethodContext) -> DenseUpdate:
    x = magnitude_trim(tasks.dense_all(), params["density"])
    return DenseUpdate(disjoint_mean(x, elect_sign(x, params["sign_method"])))


SPEC = register(MethodSpec(
    name="ties", label="TIES",
    description="Trim each LoRA's update to its largest entries, elect a sign per entry, average "
                "the agreeing entries. Dense per module (on the device).",
    params=(LAM, DENSITY, SIGN_METHOD), fn=ties))
