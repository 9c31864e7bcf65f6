"""domerge_widgets — ipywidgets toolkit over ``domerge_core`` (no ComfyUI, no merging logic).

- `MergePanel(loras=[paths] | folder=...)`: inputs, method and parameters from the core
  registry, Merge / Cancel with progress, live re-merge on slider moves, diagnostics and plots, Save.
- `PreviewPanel(pipe, panel)`: a fixed-seed grid of base / each LoRA alone / stacking / merged
  rendered with a diffusers pipeline, adapters unloaded afterwards.
"""
from .debounce import Debouncer
from .panel import MergePanel
from .preview import PreviewPanel

__all__ = ["MergePanel", "PreviewPanel", "Debouncer"]
