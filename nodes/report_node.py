"""LoRA Merge Report: the merge's diagnostics as an IMAGE (matplotlib) and as text.

matplotlib is in the pack's requirements.txt (ComfyUI itself does not install it); without it the
node still runs: the text output is complete and the image is a blank tile, with a one-line hint in
the text, so a workflow never stops before the sampler for a missing chart library.
"""
from __future__ import annotations


import numpy as np
import torch

from . import comfy_glue as glue
from .lora_list import CATEGORY


PLOT_HINT = ("(charts need matplotlib: run `pip install -r requirements.txt` in the comfyui-domerge "
             "folder with ComfyUI's python, or install matplotlib, then restart ComfyUI)")


def can_plot() -> bool:
    try:
        import matplotlib  # noqa: F401  (imported when the node runs, never at ComfyUI start-up)
    except ImportError:
        return False
    return True


def render(report: dict) -> np.ndarray:
    """The core's diagnostics figures (domerge_core.report.plots) as one H×W×3 float array in [0, 1]."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from domerge_core.report.plots import report_image

    return report_image(report)


def report_lines(report: dict) -> str:
    from domerge_core.report.text import render_merge
    return render_merge(report)


class DomergeMergeReport:
    DESCRIPTION = ("Shows the diagnostics of a merge from 'DO-Merge LoRAs': per-block update norms per "
                   "LoRA and the cosine similarity between the LoRAs before/after orthogonalization, "
                   "as an image and as text.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE", "STRING")
    RETURN_NAMES = ("image", "text")
    OUTPUT_TOOLTIPS = ("The diagnostics chart (connect Preview Image).", "The diagnostics as text.")
    FUNCTION = "report"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "lora": ("LORA_MODEL", {"tooltip": "The merged LoRA straight from 'DO-Merge LoRAs'."}),
        }}

    def report(self, lora):
        result = getattr(lora, "result", None)
        if result is None:
            raise glue.NodeInputError("this LORA_MODEL carries no merge diagnostics: connect the "
                                      "'lora' output of 'DO-Merge LoRAs' directly")
        text = (getattr(lora, "text", "") + "\n\n" + report_lines(result.report)).strip()
        if can_plot():
            img = torch.from_numpy(render(result.report)).unsqueeze(0)
        else:
            img = torch.ones((1, 64, 64, 3), dtype=torch.float32)
            text = text + "\n" + PLOT_HINT
        return (img, text)
