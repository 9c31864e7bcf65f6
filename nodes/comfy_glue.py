"""What the nodes need from ComfyUI, in one place: LoRA file lookup, progress/cancel, devices, key maps.

ComfyUI's modules (``folder_paths``, ``comfy.*``) are imported inside the functions, so
``import domerge_nodes`` works outside ComfyUI too (docs, packaging checks); every function here
runs only inside a ComfyUI process (server or library mode).
"""
from __future__ import annotations

import os
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import domerge_core
from domerge_core import DomergeError

LORA_FOLDER = "loras"
NONE_CHOICE = "None"
SAFETENSORS = (".safetensors", ".sft")


class NodeInputError(DomergeError):
    """A bad node input (unknown LoRA name, unsafe prefix...): shown as the node's error."""


def lora_names() -> List[str]:
    """The safetensors LoRAs ComfyUI knows (first entry ``None`` = no LoRA)."""
    import folder_paths

    names = [n for n in folder_paths.get_filename_list(LORA_FOLDER) if n.lower().endswith(SAFETENSORS)]
    return [NONE_CHOICE] + names


def lora_path(name: str) -> str:
    """Full path of a LoRA listed by ComfyUI. Only names from ``folder_paths`` resolve (so no
    ``..`` or absolute paths can escape the LoRA folders), and only safetensors files."""
    import folder_paths

    if not isinstance(name, str) or not name or name == NONE_CHOICE:
        raise NodeInputError(f"no LoRA selected ({name!r})")
    if not name.lower().endswith(SAFETENSORS):
        raise NodeInputError(f"{name}: only .safetensors LoRAs are read (never pickle files)", file=name)
    if name not in folder_paths.get_filename_list(LORA_FOLDER):
        raise NodeInputError(f"{name}: not found in the {LORA_FOLDER} folders "
                             f"({', '.join(folder_paths.get_folder_paths(LORA_FOLDER))})", file=name)
    path = folder_paths.get_full_path(LORA_FOLDER, name)
    if path is None or not os.path.isfile(path):
        raise NodeInputError(f"{name}: file is gone (refresh the node list)", file=name)
    return path


def file_identity(name: str) -> str:
    """``path|size|mtime_ns`` of a listed LoRA (``IS_CHANGED``): a rewritten file re-runs the graph."""
    try:
        path = lora_path(name)
        st = os.stat(path)
    except (DomergeError, OSError) as e:
        return f"{name}|unavailable|{e}"
    return f"{path}|{st.st_size}|{st.st_mtime_ns}"


def progress_callback(node_id: Optional[str] = None) -> Callable[[int, int, str], None]:
    """The core's ``progress(done, total, stage)`` driving ComfyUI's progress bar; it raises
    ComfyUI's interrupt exception when the user presses Cancel, which stops the merge."""
    import comfy.model_management
    import comfy.utils

    state: Dict[str, Any] = {"bar": None, "total": None}

    def progress(done: int, total: int, stage: str) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        total = max(int(total), 1)
        if state["bar"] is None or state["total"] != total:
            state["bar"] = comfy.utils.ProgressBar(total, node_id=node_id)
            state["total"] = total
        state["bar"].update_absolute(min(int(done), total), total)

    return progress


def device_choices() -> List[str]:
    import torch

    out = ["auto", "cpu"]
    if torch.cuda.is_available():
        out += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        out.append("mps")
    return out


def resolve_device(choice: str) -> str:
    """``auto`` = the device ComfyUI itself computes on (``--cpu`` makes that the CPU)."""
    if choice == "auto":
        import comfy.model_management

        return str(comfy.model_management.get_torch_device())
    return choice


# ------------------------------------------------------------------------------------------
# alignment through ComfyUI's own key maps

def comfy_key_map(model=None, clip=None) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(UNet map, CLIP map): LoRA module name -> model weight key (or (key, slice) tuple)."""
    import comfy.lora

    unet = comfy.lora.model_lora_keys_unet(model.model, {}) if model is not None else {}
    te = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {}) if clip is not None else {}
    return unet, te


def base_weight_fn(model=None, clip=None):
    """``fn(canonical key, module name) -> weight or None`` over the connected MODEL / CLIP, found
    through ComfyUI's key maps (what DoRA / OFT / BOFT / GLoRA inputs need), in the layout of the
    canonical key: a slice of a fused weight, or ``norm_out.linear`` with its halves swapped back as
    ComfyUI's ``swap_scale_shift`` does; None when neither is connected."""
    if model is None and clip is None:
        return None
    unet, te = comfy_key_map(model, clip)
    sources = [(unet, model.model if model is not None else None),
               (te, clip.cond_stage_model if clip is not None else None)]

    def get(key: str, name: str):
        comp, _, path = key.partition(".")
        names = [name, key] + (["lora_unet_" + path.replace(".", "_")] if comp in ("unet", "diffusion_model") else [])
        for table, module in sources:
            for n in names:
                target = table.get(n)
                if target is None or module is None:
                    continue
                wkey, offset, fn = (tuple(target) + (None, None))[:3] if isinstance(target, tuple) \
                    else (target, None, None)
                import comfy.utils
                if fn is not None and fn is not comfy.utils.swap_scale_shift:
                    return None       # a conversion we cannot invert: the base weight is not known
                try:
                    w = comfy.utils.get_attr(module, wkey)
                except AttributeError:
                    return None
                if offset is not None:
                    w = w.narrow(offset[0], offset[1], offset[2])
                if fn is not None:    # the diffusers layout: swap_scale_shift is its own inverse
                    w = fn(w)
                return w.detach()
        return None

    return get


def _candidates(m: domerge_core.LoraModule) -> Iterable[str]:
    """Names under which ComfyUI's key map may know a module: as written in its file, its
    canonical key, and the kohya spelling of a canonical diffusers UNet path. A DiT module's canonical
    key comes first: the q/k/v parts of a fused qkv / ``linear1`` share the file's name (the whole
    fused weight) but each has its own slice under its diffusers name."""
    comp, _, path = m.key.partition(".")
    if comp == "transformer":
        yield m.key
    if m.source_name:
        yield m.source_name
    yield m.key
    if comp == "unet":
        yield "lora_unet_" + path.replace(".", "_")
    if comp == "diffusion_model":
        yield "lora_unet_" + path.replace(".", "_")


class KeyAligner:
    """Renames the modules of several LoRAs so that modules patching the same model weight (as
    ComfyUI's key maps say) share one key: the canonical key of the first module seen for that
    weight. Modules that patch nothing in the given MODEL/CLIP are dropped and listed."""

    def __init__(self, model=None, clip=None):
        self.unet_map, self.clip_map = comfy_key_map(model, clip)
        self.has_model, self.has_clip = model is not None, clip is not None
        self.key_for_weight: Dict[Any, str] = {}
        self.unmatched: Dict[str, List[str]] = {}
        self.matched = 0

    def _lookup(self, m) -> Any:
        for name in _candidates(m):
            for table in (self.unet_map, self.clip_map):
                if name in table:
                    return table[name]
        return None

    def align(self, lora: domerge_core.Lora) -> domerge_core.Lora:
        seen_here: Dict[Any, str] = {}
        misses: List[str] = []

        def rename(m):
            target = self._lookup(m)
            if target is None:
                is_te = domerge_core.is_text_encoder(m.key)
                if (is_te and not self.has_clip) or (not is_te and not self.has_model):
                    return m.key          # its side was not given: nothing to align against
                misses.append(m.source_name or m.key)
                return None
            ident = target if not isinstance(target, list) else tuple(target)
            if ident in seen_here:
                raise NodeInputError(f"modules {seen_here[ident]!r} and {m.source_name or m.key!r} patch the "
                                     f"same weight", file=lora.source, key=m.source_name or m.key)
            seen_here[ident] = m.source_name or m.key
            self.matched += 1
            return self.key_for_weight.setdefault(ident, m.key)

        out = lora.rekey(rename)
        if misses:
            self.unmatched[lora.source] = misses
        return out
