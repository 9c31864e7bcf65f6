"""DO-Merge LoRAs: the list, a method from the core's registry and its parameters -> one merge() call."""
from __future__ import annotations

from typing import Optional

import torch

import domerge_core

from . import comfy_glue as glue
from .lora_list import LORA_LIST, CATEGORY, entries_from_stack
from .lora_model import MergedLora
from .options_node import OPTIONS, method_params

def report_text(result, entries, aligner: Optional[glue.KeyAligner], rank, energy, device) -> str:
    lines = [f"DO-Merge: method {result.method} on {device}, {len(result.lora)} modules"]
    ranks = sorted({m.rank for m in result.lora})
    lines.append(f"output rank: {ranks[0] if len(ranks) == 1 else f'{ranks[0]}..{ranks[-1]}'}"
                 + (f" (rank limit {rank})" if rank else "") + (f" (energy {energy})" if energy else ""))
    for e, lora in zip(entries, result.inputs):
        lines.append(f"  {e['name']}: weight {e['strength']:g}, {len(lora)} modules, format {lora.format}")
        if e.get("clip_strength", e["strength"]) != e["strength"]:
            lines.append(f"    text encoder at weight {e['clip_strength']:g}")
        if e.get("block_weights"):
            lines.append(f"    block weights {e['block_weights']}")
    params = ", ".join(f"{k}={v}" for k, v in result.params.items())
    lines.append(f"parameters: {params}")
    if aligner is not None:
        lines.append(f"aligned through ComfyUI's key maps: {aligner.matched} modules matched")
        for src, keys in aligner.unmatched.items():
            lines.append(f"  unmatched in {src} ({len(keys)}): " + ", ".join(keys[:20])
                         + (" ..." if len(keys) > 20 else ""))
    from domerge_core.report.text import render_merge
    lines.append(render_merge(result.report or {}, [e["name"] for e in entries]))
    return "\n".join(lines)


class DomergeMergeLoras:
    DESCRIPTION = ("Merges the listed LoRAs into one with DO-Merging (decouple + orthogonalize) or a "
                   "classic method (task arithmetic, TIES, DARE). Exact low-rank math: 'ta' at full rank "
                   "equals chaining LoraLoaders at the same strengths. Give MODEL/CLIP to align modules "
                   "through ComfyUI's own key maps (mixes kohya, diffusers/PEFT, OneTrainer files).")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LORA_MODEL", "STRING")
    RETURN_NAMES = ("lora", "report")
    OUTPUT_TOOLTIPS = ("The merged LoRA (a state dict; works with Apply Merged LoRA, LoraModelLoader, "
                       "SaveLoRA).", "A short text report of the merge.")
    FUNCTION = "merge"

    @classmethod
    def INPUT_TYPES(cls):
        names = [s.name for s in domerge_core.list_methods()]
        labels = "; ".join(f"{s.name} = {s.label}" for s in domerge_core.list_methods())
        required = {
            "loras": (LORA_LIST, {"tooltip": "LoRAs and strengths from 'LoRA list' nodes."}),
            "method": (names, {"default": domerge_core.default_method(),
                               "tooltip": f"Merge method ({labels})."}),
            "rank": ("INT", {"default": 0, "min": 0, "max": 4096, "step": 1,
                             "tooltip": "Output rank per module; 0 = exact (sum of the input ranks)."}),
            "energy": ("FLOAT", {"default": 1.0, "min": 0.5, "max": 1.0, "step": 0.001,
                                 "tooltip": "Keep this fraction of each module's energy (squared singular "
                                            "values); 1.0 = no energy cut."}),
            "device": (glue.device_choices(), {
                "default": "auto", "tooltip": "Where to compute; auto = ComfyUI's own device."}),
            # not called "seed": the web UI would add "randomize after queue" and re-merge every run
            "merge_seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1,
                                   "tooltip": "Seed for random choices (DARE's drops, randomized SVD)."}),
        }
        return {
            "required": required,
            "optional": {
                "model": ("MODEL", {"tooltip": "Optional: align UNet/DiT modules through this model's key map."}),
                "clip": ("CLIP", {"tooltip": "Optional: align text-encoder modules through this CLIP's key map."}),
                "lora_stack": ("LORA_STACK", {"tooltip": "Optional community LORA_STACK appended to the list."}),
                "options": (OPTIONS, {"tooltip": "Optional: the method's parameters from a 'Merge options' "
                                                 "node of the same method; none = the method's defaults."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def merge(self, loras, method, rank, energy, device, merge_seed, model=None, clip=None, lora_stack=None,
              options=None, unique_id=None):
        entries = list(loras or []) + entries_from_stack(lora_stack)
        if not entries:
            raise glue.NodeInputError("no LoRAs to merge: connect a 'LoRA list'")
        params = method_params(method, options)
        base = glue.base_weight_fn(model, clip)           # DoRA inputs are read against these weights
        inputs = [domerge_core.load_lora(glue.lora_path(e["name"]), base=base) for e in entries]
        aligner = None
        if model is not None or clip is not None:
            aligner = glue.KeyAligner(model, clip)
            inputs = [aligner.align(lora) for lora in inputs]
            if not any(len(x) for x in inputs):
                raise glue.NodeInputError("no LoRA module matches the given MODEL/CLIP (wrong base model?)")
        dev = glue.resolve_device(device)
        from domerge_core.blocks import weights_and_multipliers
        weights, mults = weights_and_multipliers(
            [e["strength"] for e in entries], [e.get("clip_strength") for e in entries],
            [e.get("block_weights") for e in entries], [lo.base_model for lo in inputs])
        extra = {"multipliers": mults} if mults is not None else {}
        result = domerge_core.merge(
            inputs, method, params, weights=weights, **extra,
            rank=int(rank) or None, energy=float(energy) if float(energy) < 1.0 else None,
            device=dev, seed=int(merge_seed), progress=glue.progress_callback(unique_id))
        # float32: the in-graph LoRA stays exact (a file is written at the Save node's dtype)
        tensors, metadata = result.state_dict(format="kohya", dtype=torch.float32)
        text = report_text(result, entries, aligner, int(rank), float(energy) if energy < 1.0 else None, dev)
        out = MergedLora(tensors, result=result, metadata=metadata, text=text,
                         unmatched=aligner.unmatched if aligner else None)
        return (out, text)
