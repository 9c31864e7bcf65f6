"""The ``LORA_MODEL`` value the nodes pass around.

ComfyUI's ``LORA_MODEL`` is a plain ``dict[str, Tensor]`` (``LoraModelLoader``, ``SaveLoRA`` --
``SaveLoRANode`` before ComfyUI's V3 nodes -- and ``TrainLoraNode`` use it). `MergedLora` *is* such
a dict (kohya names, which every ComfyUI model family's key map understands) and also carries the core's `MergeResult` and the text
report, so 'Save Merged LoRA' can write the core's metadata and 'LoRA Merge Report' can draw the
diagnostics. Any other dict still works with the apply and save nodes.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch


class MergedLora(dict):
    def __init__(self, tensors: Dict[str, torch.Tensor], *, result=None, metadata: Optional[Dict[str, str]] = None,
                 text: str = "", unmatched: Optional[Dict[str, list]] = None):
        super().__init__(tensors)
        self.result = result
        self.metadata = dict(metadata or {})
        self.text = text
        self.unmatched = dict(unmatched or {})
