"""Save Merged LoRA: write a LORA_MODEL as safetensors into the first loras folder (never overwrites)."""
from __future__ import annotations

import os
import re

import domerge_core
from domerge_core.formats.dtypes import OUTPUT_CHOICES, torch_dtype

from . import comfy_glue as glue
from .lora_list import CATEGORY

MAX_COUNTER = 99999
AUTO = "auto"


def check_prefix(prefix: str) -> str:
    """A relative, forward prefix inside the loras folder; ``..``, absolute paths, drive letters and
    empty names are refused. Returns it normalised to '/' separators."""
    if not isinstance(prefix, str) or not prefix.strip():
        raise glue.NodeInputError("filename_prefix is empty")
    from domerge_core.errors import escape_controls
    if escape_controls(prefix) != prefix:      # newlines, ANSI escapes, NUL, bidi overrides...
        raise glue.NodeInputError(f"filename_prefix {escape_controls(prefix)!r} contains control characters; "
                                  f"use plain letters, digits, '_', '-' and '/'")
    p = prefix.strip().replace("\\", "/")
    if p.startswith("/") or os.path.isabs(prefix) or re.match(r"^[A-Za-z]:", p):
        raise glue.NodeInputError(f"filename_prefix {prefix!r} is absolute: give a name inside the loras folder")
    parts = p.split("/")
    if any(x in ("..", ".") for x in parts) or any(x == "" for x in parts):
        raise glue.NodeInputError(f"filename_prefix {prefix!r} may not contain '..', '.' or empty parts")
    return p


def output_path(prefix: str, start: int = 1):
    """(full path, name as listed by ComfyUI, counter) of the first free ``<prefix>_NNNNN.safetensors``
    from counter ``start`` on (a dangling link or anything else at a name makes it taken)."""
    import folder_paths

    p = check_prefix(prefix)
    root = os.path.realpath(folder_paths.get_folder_paths(glue.LORA_FOLDER)[0])
    sub, base = os.path.split(p)
    folder = os.path.realpath(os.path.join(root, sub))
    if os.path.commonpath([root, folder]) != root:       # e.g. a symlinked subfolder pointing out
        raise glue.NodeInputError(f"filename_prefix {prefix!r} leaves the loras folder {root}")
    os.makedirs(folder, exist_ok=True)
    for i in range(start, MAX_COUNTER + 1):
        name = f"{base}_{i:05d}.safetensors"
        full = os.path.join(folder, name)
        if not os.path.lexists(full):
            return full, (f"{sub}/{name}" if sub else name), i
    raise glue.NodeInputError(f"no free file name for {prefix!r} in {folder}")


class DomergeSaveLora:
    DESCRIPTION = ("Saves a merged LoRA as .safetensors into the first loras folder (with the merge's "
                   "metadata), so the stock LoRA loaders list it after a refresh. The prefix may name "
                   "subfolders but never leaves the folder; an existing file is never replaced.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("lora_name",)
    OUTPUT_TOOLTIPS = ("The saved file's name as the LoRA loaders list it.",)
    FUNCTION = "save"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "lora": ("LORA_MODEL", {"tooltip": "The merged LoRA to save."}),
            "filename_prefix": ("STRING", {"default": "domerge/merged",
                                           "tooltip": "Name inside the loras folder (subfolders allowed; "
                                                      "_00001, _00002 ... is appended)."}),
            "format": ([AUTO] + list(domerge_core.FORMATS), {
                "default": AUTO, "tooltip": "File layout: auto (the first input's, or diffusers where a stock loader "
                                            "would skip it, e.g. kohya-named Flux/SD3), kohya (SD1.x/SDXL: "
                                            "ComfyUI, A1111/Forge, diffusers), diffusers (ComfyUI and diffusers; "
                                            "the one for Flux/SD3), or peft (PEFT adapters of non-diffusion models "
                                            "only). A layout a stock loader would skip is refused with the reason."}),
            "dtype": (list(OUTPUT_CHOICES), {"default": "fp16", "tooltip": "Precision of the saved factors."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, filename_prefix=None, **_):
        if filename_prefix is None:      # linked from another node: checked when it runs
            return True
        try:
            check_prefix(filename_prefix)
        except glue.NodeInputError as e:
            return str(e)
        return True

    def save(self, lora, filename_prefix, format, dtype):
        check_prefix(filename_prefix)
        result = getattr(lora, "result", None)
        src = result.lora if result is not None else domerge_core.load_state_dict(dict(lora), source="LORA_MODEL")
        try:       # a layout the stock loaders would skip is refused, not written
            format = domerge_core.check_loadable(src, None if format == AUTO else format)
        except domerge_core.LoraFormatError as e:
            raise glue.NodeInputError(str(e)) from None
        start = 1
        while True:
            full, listed, i = output_path(filename_prefix, start)
            try:
                if result is not None:
                    result.save(full, format=format, dtype=torch_dtype(dtype), overwrite=False)
                else:  # a plain LORA_MODEL (e.g. TrainLoraNode's): read through the core, write the same way
                    domerge_core.save_lora(src, full, format=format, dtype=torch_dtype(dtype), overwrite=False)
            except domerge_core.OutputExistsError:
                # another save (a second queue item, another node) took the name after we chose it:
                # the write never replaces a file, so take the next free counter
                if not os.path.lexists(full) or i >= MAX_COUNTER:
                    raise
                start = i + 1
                continue
            return {"ui": {"text": [listed]}, "result": (listed,)}
