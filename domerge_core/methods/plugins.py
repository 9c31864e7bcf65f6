"""Decouple and orthogonalize: the switches every method has (the paper's "near free lunch").

Declared once here and appended to `registry.PLUGIN_PARAMS`; `MethodSpec.all_params()` lists them
after the method's own parameters. ``do`` turns both on through ``defaults_override``.
Defaults: measured on benchmarks/quality (RESULTS.md); do overrides decouple, orthogonalize and recombine.
"""
from __future__ import annotations

from ..algebra.decouple import MAGNITUDE_RULES, RECOMBINE_RULES
from ..algebra.orthogonalize import OPTIMIZERS
from .registry import PLUGIN_PARAMS, Param

PARAMS = [
    Param("decouple", "bool", False, label="Decouple",
          help="Split each LoRA's update into column magnitudes and unit directions, merge them "
               "separately and recombine, so a LoRA with a much larger norm does not dominate."),
    Param("orthogonalize", "bool", False, label="Orthogonalize",
          help="Data-free descent that nudges the LoRAs' factors towards mutually orthogonal "
               "updates before merging (less interference)."),
    Param("orth_steps", "int", 10, min=0, max=1000, step=1, label="Orth. steps",
          help="Descent steps of the orthogonalization. 10 (gd): 30, 100 and 300 scored within noise "
               "of it on benchmarks/quality; adam needs more."),
    Param("orth_lr", "float", 1.0, min=0.01, max=1.9, step=0.01, label="Orth. step size",
          help="Step size relative to the optimizer's own default: gd uses lr/L (L = Hessian bound, "
               "stable below 2); adam uses lr·0.03·RMS of each factor's coordinates."),
    Param("orth_gamma", "float", 0.1, min=0.0, max=100.0, step=0.01, label="Orth. γ",
          help="Weight of the stay-close term γ·‖δ‖²/‖A‖²: larger keeps the factors closer to the "
               "originals, smaller orthogonalizes more. Default 0.1: for do, mean rank 6.42 vs 7.42 for 0.5 "
               "over the 12 validation cells of benchmarks/quality (1 and 10 lost in the digits sweep)."),
    Param("orth_optimizer", "choice", "gd", choices=OPTIMIZERS, label="Orth. optimizer",
          help="gd: gradient descent with a Lipschitz step (rotation-equivariant, exact in the span "
               "coordinates); adam: Adam run in those coordinates."),
    Param("balanced", "bool", True, label="Balanced form",
          help="Put every LoRA in the balanced form U√S, √S Vᵀ before orthogonalizing, so the result "
               "does not depend on how a trainer split scale between up and down."),
    Param("magnitude", "choice", "weighted_mean", choices=MAGNITUDE_RULES,
          label="Magnitude merge",
          help="How decouple merges column magnitudes: strength-weighted mean (plain mean at equal "
               "strengths), mean of the strength-scaled magnitudes, or their maximum."),
    Param("recombine", "choice", "v1", choices=RECOMBINE_RULES, label="Recombine",
          help="v1: λ·direction·magnitude; v2: norm-preserving, each merged column gets exactly the "
               "merged magnitude (times λ). do uses v2 (at strengths 1 the merge no longer grows with the "
               "number of LoRAs); the plug-in default for other methods stays v1."),
]

if not any(p.name == "decouple" for p in PLUGIN_PARAMS):
    PLUGIN_PARAMS.extend(PARAMS)
