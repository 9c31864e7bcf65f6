"""The state of one merge run, passed to every stage instead of long parameter lists."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch

from ..algebra.orthogonalize import OrthOptions
from ..methods.base import MethodContext
from ..methods.registry import MethodSpec
from ..progress import ProgressFn, report
from .cache import MergeCache


@dataclass
class RunContext:
    spec: MethodSpec
    params: Dict[str, Any]                 # resolved (defaults filled in, validated)
    device: torch.device
    dtype: torch.dtype                     # compute dtype
    sources: List[str]                     # per input: file path (for errors)
    tags: List[str]                        # per input: stable name (for seeds)
    rank: Optional[int] = None
    energy: Optional[float] = None
    seed: int = 0
    cache: Optional[MergeCache] = None
    progress: Optional[ProgressFn] = None
    total: int = 0                         # modules to merge (progress)
    counters: Dict[str, int] = field(default_factory=dict)

    @property
    def lam(self) -> float:
        return float(self.params.get("lam", 1.0))

    @property
    def truncating(self) -> bool:
        return self.rank is not None or self.energy is not None

    @property
    def orthogonalizing(self) -> bool:
        return bool(self.params.get("orthogonalize"))

    def orth_options(self) -> OrthOptions:
        return orth_options(self.params)

    def method_context(self) -> MethodContext:
        return MethodContext(seed=int(self.seed), device=self.device, dtype=self.dtype)

    def quiet(self) -> "RunContext":
        """The same run without cache or progress (re-running one module to locate a failure)."""
        return RunContext(self.spec, self.params, self.device, self.dtype, self.sources, self.tags,
                          self.rank, self.energy, self.seed)

    def tick(self, stage: str, n: int) -> None:
        if self.progress is None:
            return
        for _ in range(n):
            self.counters[stage] = self.counters.get(stage, 0) + 1
            report(self.progress, self.counters[stage], self.total, stage)


def orth_options(params: Dict[str, Any]) -> OrthOptions:
    """The orthogonalization options from resolved method parameters (their defaults live in the
    registry's `Param`s only)."""
    return OrthOptions(steps=int(params["orth_steps"]), lr=float(params["orth_lr"]),
                       gamma=float(params["orth_gamma"]), optimizer=str(params["orth_optimizer"]),
                       balanced=bool(params["balanced"]))
