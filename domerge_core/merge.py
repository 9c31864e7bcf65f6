"""The one door every adapter uses: ``merge(inputs, method, params, ...) -> MergeResult``.

STUB — the merge-engine work (issue 3) implements this; the signature and `MergeResult`'s
fields are the contract the CLI, nodes and widgets are written against.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from .lora import Lora
from .progress import ProgressFn

LoraLike = Union[Lora, str, "os.PathLike[str]"]


@dataclass
class MergeResult:
    lora: Lora                               # merged modules (scale 1.0, canonical keys), format "merged"
    method: str
    params: Dict[str, Any]                   # resolved parameters (defaults filled in)
    weights: List[float]                     # user strengths, one per input
    inputs: List[Lora]
    report: Dict[str, Any] = field(default_factory=dict)   # diagnostics, JSON-serialisable

    def state_dict(self, format: Optional[str] = None, dtype: Optional[torch.dtype] = None
                   ) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
        """(tensors, metadata) in a file layout (default: the first input's), for diffusers'
        ``load_lora_weights``, ComfyUI's LORA_MODEL, or a writer."""
        raise NotImplementedError

    def save(self, path: str, format: Optional[str] = None, dtype: Optional[torch.dtype] = None,
             overwrite: bool = False) -> str:
        """Write atomically; refuses to replace an existing file unless ``overwrite``."""
        raise NotImplementedError


class MergeCache:
    """Per-LoRA work that survives strength/λ changes (balanced forms, orthogonalized factors)."""


def merge(inputs: Sequence[LoraLike], method: str = "do", params: Optional[Dict[str, Any]] = None, *,
          weights: Optional[Sequence[float]] = None, rank: Optional[int] = None,
          energy: Optional[float] = None, device: str = "auto",
          compute_dtype: torch.dtype = torch.float32, seed: int = 0,
          progress: Optional[ProgressFn] = None, cache: Optional[MergeCache] = None) -> MergeResult:
    raise NotImplementedError
