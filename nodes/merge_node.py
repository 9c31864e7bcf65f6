"""DO-Merge LoRAs: the list, a method from the core's registry and its parameters -> one merge() call."""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch

import domerge_core

from . import comfy_glue as glue
from .lora_list import LORA_LIST, CATEGORY, entries_from_stack
from .lora_model import MergedLora

# inputs of the node itself; a method parameter with one of these names would be shadowed
FIXED_INPUTS = ("loras", "method", "rank", "energy", "device", "merge_seed", "seed", "model", "clip", "lora_stack")
METHOD_DEFAULT = "method default"


def _param_input(p: domerge_core.Param, default_varies: bool, users: List[str]):
    tip = (p.help or p.label or p.name) + f" (used by: {', '.join(users)})"
    if p.type == "bool":
        if default_varies:
            return ([METHOD_DEFAULT, "on", "off"], {
                "default": METHOD_DEFAULT, "tooltip": tip + "; 'method default' = the method's own choice"})
        return ("BOOLEAN", {"default": bool(p.default), "tooltip": tip})
    if p.type == "choice":
        return (list(p.choices), {"default": p.default, "tooltip": tip})
    kind = "INT" if p.type == "int" else "FLOAT"
    lo = p.min if p.min is not None else (-1_000_000 if kind == "INT" else -1e6)
    hi = p.max if p.max is not None else (1_000_000 if kind == "INT" else 1e6)
    step = p.step if p.step is not None else (1 if kind == "INT" else 0.01)
    opts = {"default": p.default, "min": lo, "max": hi, "step": step, "tooltip": tip}
    if kind == "INT":
        opts = {k: (int(v) if k in ("default", "min", "max", "step") else v) for k, v in opts.items()}
    return (kind, opts)


def method_param_inputs() -> Dict[str, Any]:
    """One widget per parameter name over all registered methods (a new method shows up here
    without edits); a bool whose default differs between methods gets 'method default'/on/off."""
    specs = domerge_core.list_methods()
    first: Dict[str, domerge_core.Param] = {}
    defaults: Dict[str, set] = {}
    users: Dict[str, List[str]] = {}
    for spec in specs:
        for p in spec.all_params():
            if p.name in FIXED_INPUTS:
                continue
            first.setdefault(p.name, p)
            defaults.setdefault(p.name, set()).add(repr(p.default))
            users.setdefault(p.name, []).append(spec.name)
    return {name: _param_input(p, len(defaults[name]) > 1, users[name]) for name, p in first.items()}


def method_params(method: str, widgets: Dict[str, Any]) -> Dict[str, Any]:
    """The widget values the chosen method declares ('method default' leaves the core's default)."""
    spec = domerge_core.get_method(method)
    out = {}
    for p in spec.all_params():
        if p.name not in widgets:
            continue
        v = widgets[p.name]
        if v == METHOD_DEFAULT:
            continue
        if p.type == "bool" and v in ("on", "off"):
            v = v == "on"
        out[p.name] = v
    return out


def report_text(result, entries, aligner: Optional[glue.KeyAligner], rank, energy, device) -> str:
    lines = [f"DO-Merge: method {result.method} on {device}, {len(result.lora)} modules"]
    ranks = sorted({m.rank for m in result.lora})
    lines.append(f"output rank: {ranks[0] if len(ranks) == 1 else f'{ranks[0]}..{ranks[-1]}'}"
                 + (f" (rank limit {rank})" if rank else "") + (f" (energy {energy})" if energy else ""))
    for e, lora in zip(entries, result.inputs):
        lines.append(f"  {e['name']}: weight {e['strength']:g}, {len(lora)} modules, format {lora.format}")
        if e.get("clip_strength", e["strength"]) != e["strength"]:
            lines.append(f"    (LORA_STACK clip weight {e['clip_strength']:g} not used: a merged LoRA has one "
                         f"weight per input; set strength_clip when applying)")
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
                       "SaveLoRANode).", "A short text report of the merge.")
    FUNCTION = "merge"

    @classmethod
    def INPUT_TYPES(cls):
        names = [s.name for s in domerge_core.list_methods()]
        labels = "; ".join(f"{s.name} = {s.label}" for s in domerge_core.list_methods())
        required = {
            "loras": (LORA_LIST, {"tooltip": "LoRAs and strengths from 'LoRA list' nodes."}),
            "method": (names, {"default": "do" if "do" in names else names[0],
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
        required.update(method_param_inputs())
        return {
            "required": required,
            "optional": {
                "model": ("MODEL", {"tooltip": "Optional: align UNet/DiT modules through this model's key map."}),
                "clip": ("CLIP", {"tooltip": "Optional: align text-encoder modules through this CLIP's key map."}),
                "lora_stack": ("LORA_STACK", {"tooltip": "Optional community LORA_STACK appended to the list."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def merge(self, loras, method, rank, energy, device, merge_seed, model=None, clip=None, lora_stack=None,
              unique_id=None, **widgets):
        entries = list(loras or []) + entries_from_stack(lora_stack)
        if not entries:
            raise glue.NodeInputError("no LoRAs to merge: connect a 'LoRA list'")
        params = method_params(method, widgets)
        inputs = [domerge_core.load_lora(glue.lora_path(e["name"])) for e in entries]
        aligner = None
        if model is not None or clip is not None:
            aligner = glue.KeyAligner(model, clip)
            inputs = [aligner.align(lora) for lora in inputs]
            if not any(len(x) for x in inputs):
                raise glue.NodeInputError("no LoRA module matches the given MODEL/CLIP (wrong base model?)")
        dev = glue.resolve_device(device)
        result = domerge_core.merge(
            inputs, method, params, weights=[e["strength"] for e in entries],
            rank=int(rank) or None, energy=float(energy) if float(energy) < 1.0 else None,
            device=dev, seed=int(merge_seed), progress=glue.progress_callback(unique_id))
        # float32: the in-graph LoRA stays exact (a file is written at the Save node's dtype)
        tensors, metadata = result.state_dict(format="kohya", dtype=torch.float32)
        text = report_text(result, entries, aligner, int(rank), float(energy) if energy < 1.0 else None, dev)
        out = MergedLora(tensors, result=result, metadata=metadata, text=text,
                         unmatched=aligner.unmatched if aligner else None)
        return (out, text)
