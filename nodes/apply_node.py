"""Apply Merged LoRA: patch MODEL and CLIP with a LORA_MODEL through ComfyUI's own loader."""
from __future__ import annotations

from .lora_list import CATEGORY


class DomergeApplyLora:
    DESCRIPTION = ("Applies a merged LoRA (LORA_MODEL) to MODEL and CLIP exactly like LoraLoader does "
                   "with a file, through comfy.sd.load_lora_for_models; nothing is written to disk.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL", "CLIP")
    RETURN_NAMES = ("model", "clip")
    OUTPUT_TOOLTIPS = ("The patched diffusion model.", "The patched text encoder.")
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "The diffusion model to patch."}),
            "clip": ("CLIP", {"tooltip": "The text encoder to patch."}),
            "lora": ("LORA_MODEL", {"tooltip": "A merged LoRA from 'DO-Merge LoRAs' (or any LORA_MODEL)."}),
            "strength_model": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01,
                                         "tooltip": "How strongly to apply it to the diffusion model."}),
            "strength_clip": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01,
                                        "tooltip": "How strongly to apply it to the text encoder."}),
        }}

    def apply(self, model, clip, lora, strength_model, strength_clip):
        if strength_model == 0 and strength_clip == 0:
            return (model, clip)
        import comfy.sd

        model_out, clip_out = comfy.sd.load_lora_for_models(model, clip, dict(lora), strength_model, strength_clip)
        return (model_out, clip_out)
