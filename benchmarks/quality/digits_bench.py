"""The digits-ViT benchmark seen through the shared protocols (`protocols.py`).

Wraps one `run.SeedBench` (its backbone, hetero LoRAs, heads and splits): ``score`` is the
normalized accuracy of each task (merged ÷ own LoRA, each task with its own head), as in the
main table; the T = 2 / 3 subsets are seeded draws of the 8 tasks.
"""
from __future__ import annotations

import random
from typing import Dict, List, Sequence

import data as D

LAM_GRID = (0.1, 0.15, 0.2, 0.3, 0.45, 0.7, 1.0, 1.5, 2.0)


class DigitsBench:
    name = "digits"
    lam_grid = LAM_GRID

    def __init__(self, seed_bench):
        self.sb = seed_bench
        self.seed = seed_bench.seed
        hetero = seed_bench.loras["hetero"]
        self.loras = {t: hetero[t].lora for t in D.TASKS}
        self.heads = {t: hetero[t].head for t in D.TASKS}
        rng = random.Random(6_000 + self.seed)
        self.subsets: Dict[str, List[str]] = {"T=2": rng.sample(list(D.TASKS), 2),
                                              "T=3": rng.sample(list(D.TASKS), 3),
                                              "all": list(D.TASKS)}

    def score(self, lora, tasks: Sequence[str], split: str) -> Dict[str, float]:
        accs = self.sb.accuracies(lora, split, {t: self.heads[t] for t in tasks}, list(tasks))
        return {t: accs[t] / max(self.sb.individual("hetero", t, split), 1e-6) for t in tasks}
