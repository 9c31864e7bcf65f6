"""Parameters several methods share."""
from __future__ import annotations

from .registry import Param

LAM = Param("lam", "float", 1.0, min=0.0, max=5.0, step=0.05, label="λ",
            help="Overall scale of the merged update (CLI --lambda). With λ = 1 one LoRA at "
                 "strength w gives exactly w·ΔW.")
DENSITY = Param("density", "float", 0.5, min=0.01, max=1.0, step=0.01, label="Density",
                help="TIES: fraction of each LoRA's entries (per module, largest |value|) kept.")
SIGN_METHOD = Param("sign_method", "choice", "total", choices=("total", "frequency"), label="Sign election",
                    help="TIES sign election: sign of the summed values (total) or of the sign count (frequency).")
DROP_RATE = Param("drop_rate", "float", 0.5, min=0.0, max=0.99, step=0.01, label="Drop rate",
                  help="DARE: probability of dropping each entry of each LoRA's update (seeded).")
RESCALE = Param("rescale", "bool", True, label="Rescale",
                help="DARE: divide the kept entries by 1 − drop_rate (keeps the expected update).")
