"""TIES-merging (Yadav et al. 2023): trim each task to its largest entries, elect a sign per entry,
average the entries that agree with it.

Definition (settled against PEFT, tests/test_methods_peft_ties.py): PEFT's ``merge_utils.ties``
applied to the strength-scaled updates ``w_i·ΔW_i`` with unit weights — so a LoRA's strength acts
exactly like its own scale (alpha), and strength −1 is the negated LoRA. PEFT's weighted call
``ties(ΔW_i, weights=w)`` elects the sign on the unweighted updates and weights afterwards; it equals
ours when all strengths are equal and positive and differs otherwise (a LoRA at −1 still votes with
its own sign). mergekit elects on the weighted deltas as we do but divides by the agreeing weights'
sum, which makes a uniform strength change a no-op — not what a strength slider means.

Dense: the trimmed, sign-resolved merge is full rank. At the default output rank Σ r_i the written
file keeps only part of it (typically 50–80 % of the energy for 3 rank-32 SD LoRAs; 99 % needs a
rank of ~2/3 of the layer width, a file larger than the dense weights), with the error reported per
module. ``knots_ties`` / ``core_ties`` run TIES in an aligned low-rank space and are exact at rank
≤ Σ r_i."""
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
                "the agreeing entries (PEFT's TIES on the strength-scaled LoRAs). Dense and full rank: "
                "the written file is a truncation (error reported); knots_ties / core_ties are exact low rank.",
    params=(LAM, DENSITY, SIGN_METHOD), fn=ties))
