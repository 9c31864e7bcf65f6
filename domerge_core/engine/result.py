"""Stage 4, result: the merged modules as a `Lora`, the report, and `MergeResult`."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..lora import Lora, LoraModule
from .plan import ModuleJob


@dataclass
class MergeResult:
    lora: Lora                               # merged modules (scale 1.0, canonical keys), format "merged"
    method: str
    params: Dict[str, Any]                   # resolved parameters (defaults filled in)
    weights: List[float]                     # user strengths, one per input
    inputs: List[Lora]
    report: Dict[str, Any] = field(default_factory=dict)   # diagnostics, JSON-serialisable

    def _metadata(self) -> Dict[str, str]:
        from ..metadata import output_metadata
        return output_metadata(self.inputs, weights=self.weights, method=self.method, params=self.params,
                               rank_info=self.lora)

    def state_dict(self, format: Optional[str] = None, dtype: Optional[torch.dtype] = None
                   ) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
        """(tensors, metadata) in a file layout (default: the first input's), for diffusers'
        ``load_lora_weights``, ComfyUI's LORA_MODEL, or a writer. ``dtype`` defaults to the first
        input's dtype."""
        from ..formats import to_state_dict
        return to_state_dict(self.lora, format, dtype=dtype, metadata=self._metadata())

    def save(self, path: str, format: Optional[str] = None, dtype: Optional[torch.dtype] = None,
             overwrite: bool = False) -> str:
        """Write atomically; refuses to replace an existing file unless ``overwrite`` (and never
        writes over an input)."""
        from ..formats import save_lora
        return save_lora(self.lora, path, format=format, dtype=dtype, metadata=self._metadata(),
                         overwrite=overwrite, inputs=[l.source for l in self.inputs if l.source])


class Collector:
    """Per-module output factors and report records, batch by batch (on the CPU)."""

    def __init__(self) -> None:
        self.factors: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}
        self.records: Dict[str, Dict[str, Any]] = {}

    def add(self, batch: Sequence[ModuleJob], out, pre) -> None:
        up, down, ks, err = out
        up, down = up.cpu(), down.cpu()
        stats = pre.stat_lists()
        for j, (job, k, e) in enumerate(zip(batch, ks.tolist(), err.tolist())):
            k = int(k)
            self.factors[job.key] = (up[j, :, :k].contiguous(), down[j, :k, :].contiguous())
            rec = {"inputs": list(job.inputs), "rank": k, "rel_error": float(e)}
            rec.update({name: v[j] for name, v in stats.items()})
            self.records[job.key] = rec


def merged_lora(jobs: Sequence[ModuleJob], factors: Dict[str, Tuple[torch.Tensor, torch.Tensor]],
                loras: Sequence[Lora]) -> Lora:
    """The merged modules in plan order, laid out like the first input (its writer hints and
    dtype: what the writers use by default; the factors themselves are in the compute dtype)."""
    modules: Dict[str, LoraModule] = {}
    for job in jobs:
        if job.key in factors:
            up, down = factors[job.key]
            first = job.first
            modules[job.key] = LoraModule.from_tensors(job.key, up, down, 1.0, kernel_size=first.kernel_size,
                                                       source_name=first.source_name)
    first_lora = loras[0]
    layout = dict(first_lora.layout or {})
    if "format" not in layout:
        from ..formats import default_format
        layout["format"] = default_format(first_lora)
    return Lora(modules=modules, format="merged", source="<merged>", metadata={}, dtype=first_lora.dtype,
                base_model=first_lora.base_model, layout=layout)
