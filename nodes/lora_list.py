"""LoRA list: pick LoRAs and strengths for a merge; chainable; also takes community LORA_STACKs."""
from __future__ import annotations

from typing import Any, Dict, List, Optional

from . import comfy_glue as glue

CATEGORY = "loaders/domerge"
LORA_LIST = "DOMERGE_LORA_LIST"      # list of {"name", "strength", "clip_strength"}


def entries_from_stack(stack: Any) -> List[Dict[str, Any]]:
    """Community ``LORA_STACK`` (Efficiency / Comfyroll / rgthree): [(name, model_w, clip_w), ...];
    entries named ``None`` are skipped, as those packs do."""
    out = []
    for i, item in enumerate(stack or []):
        try:
            name, model_w, clip_w = item[0], float(item[1]), float(item[2])
        except (TypeError, ValueError, IndexError):
            raise glue.NodeInputError(f"LORA_STACK entry {i} is {item!r}, not (name, model_w, clip_w)") from None
        if name in (None, glue.NONE_CHOICE, ""):
            continue
        out.append({"name": str(name), "strength": model_w, "clip_strength": clip_w})
    return out


class DomergeLoraList:
    DESCRIPTION = ("Adds one LoRA (by name from the loras folder) and its strength to a list for "
                   "'DO-Merge LoRAs'. Chain several of these nodes, or feed a LORA_STACK from "
                   "Efficiency / Comfyroll / rgthree stack nodes.")
    CATEGORY = CATEGORY
    RETURN_TYPES = (LORA_LIST,)
    RETURN_NAMES = ("loras",)
    OUTPUT_TOOLTIPS = ("The LoRAs so far, in order, with their strengths.",)
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "lora_name": (glue.lora_names(), {
                    "tooltip": "A .safetensors LoRA from the loras folder (None: add nothing, just pass the list on)."}),
                "strength": ("FLOAT", {
                    "default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01,
                    "tooltip": "Weight of this LoRA in the merge (like LoraLoader's strength_model)."}),
            },
            "optional": {
                "loras": (LORA_LIST, {"tooltip": "An earlier LoRA list to extend (chain these nodes)."}),
                "lora_stack": ("LORA_STACK", {
                    "tooltip": "A community LORA_STACK [(name, model_w, clip_w)]: the model weight for the "
                               "diffusion model, the clip weight for the text encoders."}),
                "strength_clip": ("FLOAT", {
                    "default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01,
                    "tooltip": "Weight of this LoRA's text-encoder modules (like LoraLoader's strength_clip). "
                               "Used only when use_strength_clip is on; else the strength above."}),
                "use_strength_clip": ("BOOLEAN", {"default": False,
                                                  "tooltip": "Give the text encoder its own strength."}),
                "block_weights": ("STRING", {
                    "default": "", "multiline": False,
                    "tooltip": "Per-block weights of this LoRA: a preset (SD-OUTALL, SDXL-INALL, FLUX-DOUBLE, "
                               "...) or BASE,IN..,MID,OUT.. numbers (SD1 17, SDXL 12, Flux 58 values; the "
                               "Inspire pack's presets). Empty: every block at 1."}),
            },
        }

    @classmethod
    def IS_CHANGED(cls, lora_name, strength=1.0, **kw):
        # file identity: a LoRA rewritten on disk re-runs this node and everything downstream
        extra = "|".join(f"{k}={kw[k]}" for k in ("strength_clip", "use_strength_clip", "block_weights") if k in kw)
        if lora_name == glue.NONE_CHOICE:
            return f"none|{strength}|{extra}"
        return f"{glue.file_identity(lora_name)}|{strength}|{extra}"

    def build(self, lora_name: str, strength: float, loras: Optional[List[Dict[str, Any]]] = None,
              lora_stack: Any = None, strength_clip: float = 1.0, use_strength_clip: bool = False,
              block_weights: str = ""):
        out = [dict(e) for e in (loras or [])]
        out += entries_from_stack(lora_stack)
        if lora_name != glue.NONE_CHOICE:
            glue.lora_path(lora_name)           # unknown / non-safetensors names fail here, by name
            e = {"name": lora_name, "strength": float(strength),
                 "clip_strength": float(strength_clip if use_strength_clip else strength)}
            if block_weights and block_weights.strip():
                from domerge_core.blocks import parse_vector
                try:
                    parse_vector(block_weights)
                except Exception as err:
                    raise glue.NodeInputError(f"block_weights: {err}") from None
                e["block_weights"] = block_weights.strip()
            out.append(e)
        return (out,)
