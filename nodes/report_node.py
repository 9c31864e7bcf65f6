"""LoRA Merge Report: the merge's diagnostics as an IMAGE (matplotlib) and as text."""
from __future__ import annotations

import json

import numpy as np
import torch

from . import comfy_glue as glue
from .lora_list import CATEGORY


def render(report: dict, width_px: int = 1200, height_px: int = 520) -> np.ndarray:
    """Per-block update norms per LoRA and the LoRA×LoRA cosine matrices before/after the
    orthogonalization, as an H×W×3 float array in [0, 1]."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    diag = report.get("diagnostics") or {}
    names = report.get("inputs") or [l.get("name", f"lora{i}") for i, l in enumerate(diag.get("loras", []))]
    blocks = diag.get("blocks") or {}
    fig = Figure(figsize=(width_px / 100, height_px / 100), dpi=100)
    FigureCanvasAgg(fig)
    gs = fig.add_gridspec(1, 3, width_ratios=[2.2, 1, 1])
    ax = fig.add_subplot(gs[0, 0])
    if blocks:
        labels = list(blocks)
        x = np.arange(len(labels))
        T = max(1, len(names))
        w = 0.8 / T
        for i, name in enumerate(names):
            vals = [blocks[b]["update_norms"][i] if i < len(blocks[b]["update_norms"]) else 0.0 for b in labels]
            ax.bar(x + (i - (T - 1) / 2) * w, vals, w, label=name)
        ax.set_xticks(x)
        ax.set_xticklabels([b.replace("text_encoder.text_model.encoder.", "te.").replace("unet.", "")
                            for b in labels], rotation=70, fontsize=6)
        ax.legend(fontsize=7)
    ax.set_title("update norm ‖ΔW‖ per block (strength 1)", fontsize=9)
    for j, (key, title) in enumerate((("cosine_before", "cosine before"), ("cosine_after", "cosine after"))):
        axc = fig.add_subplot(gs[0, j + 1])
        mat = np.array(diag.get(key) or [[1.0]], dtype=float)
        im = axc.imshow(mat, vmin=-1, vmax=1, cmap="coolwarm")
        axc.set_title(title + " orthogonalization", fontsize=9)
        ticks = range(mat.shape[0])
        short = [n[:14] for n in names][: mat.shape[0]]
        axc.set_xticks(list(ticks))
        axc.set_yticks(list(ticks))
        axc.set_xticklabels(short, rotation=60, fontsize=6)
        axc.set_yticklabels(short, fontsize=6)
        for a in ticks:
            for b in ticks:
                axc.text(b, a, f"{mat[a, b]:.2f}", ha="center", va="center", fontsize=7)
        if j == 1:
            fig.colorbar(im, ax=axc, fraction=0.046)
    fig.suptitle(f"DO-Merge report: method {report.get('method')}, magnitude variance "
                 f"{diag.get('magnitude_variance', 0.0):.3g}", fontsize=10)
    fig.tight_layout()
    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba())
    return rgba[..., :3].astype(np.float32) / 255.0


def report_lines(report: dict) -> str:
    diag = report.get("diagnostics") or {}
    out = [f"method: {report.get('method')}", f"parameters: {json.dumps(report.get('params'), default=str)}",
           f"summary: {json.dumps(report.get('summary'), default=str)}"]
    for l in diag.get("loras", []):
        out.append(f"{l['name']}: weight {l['weight']:g}, {l['modules_merged']} modules, ‖ΔW‖ "
                   f"{l['update_norm']:.4g}, ‖δA‖/‖A‖ mean {l['rel_delta_A_mean']:.3g}, "
                   f"‖δB‖/‖B‖ mean {l['rel_delta_B_mean']:.3g}")
    if "mean_abs_cos_before" in diag:
        out.append(f"mean |cos| before {diag['mean_abs_cos_before']:.4f}, after {diag['mean_abs_cos_after']:.4f}")
    out.append(f"magnitude variance: {diag.get('magnitude_variance', 0.0):.4g}")
    return "\n".join(out)


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
        img = torch.from_numpy(render(result.report)).unsqueeze(0)
        text = (getattr(lora, "text", "") + "\n\n" + report_lines(result.report)).strip()
        return (img, text)
