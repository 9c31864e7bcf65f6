"""Library mode (no server): real ComfyUI packages imported into the test process.

`setup_folders` points ComfyUI's ``folder_paths`` at temporary folders; `tiny_checkpoint` builds
(once, cached in ``.cache/comfyui/``) the tiny SD1.5 checkpoint; `patched_weight` folds a
ModelPatcher's patches into one weight exactly as ComfyUI does at sampling time.
"""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Dict

import torch

from . import runtime, tiny_sd15

# the cache folder is keyed by the fixture's source, so a change to tiny_sd15.py rebuilds the files
_FIXTURE_ID = hashlib.sha256(Path(tiny_sd15.__file__).read_bytes()).hexdigest()[:12]
_CKPT = runtime.CACHE / f"tiny_sd15-{_FIXTURE_ID}" / "tiny_sd15.safetensors"
_LORAS = runtime.CACHE / f"tiny_sd15-{_FIXTURE_ID}" / "loras"
_LOADED: Dict[str, tuple] = {}


def tiny_checkpoint() -> Path:
    """The tiny checkpoint (built once; deterministic, so a cached copy is the same file)."""
    runtime.import_comfy_library()
    if not _CKPT.is_file():
        _CKPT.parent.mkdir(parents=True, exist_ok=True)
        tmp = _CKPT.with_suffix(".tmp")
        tiny_sd15.write_checkpoint(tmp)
        os.replace(tmp, _CKPT)
    return _CKPT


def tiny_loras(dest: Path) -> Dict[str, Path]:
    """Copies of the three tiny LoRAs in ``dest`` (fresh files each call)."""
    runtime.import_comfy_library()
    if not (_LORAS / "tiny_peft_c.safetensors").is_file():
        tmp = _LORAS.with_name("loras.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tiny_sd15.write_loras(tmp)
        shutil.rmtree(_LORAS, ignore_errors=True)
        os.replace(tmp, _LORAS)
    dest.mkdir(parents=True, exist_ok=True)
    out = {}
    for p in sorted(_LORAS.glob("*.safetensors")):
        shutil.copy2(p, dest / p.name)
        out[p.stem] = dest / p.name
    return out


def setup_folders(base: Path) -> Dict[str, Path]:
    """ComfyUI folders under ``base`` (loras, checkpoints, output); returns them."""
    runtime.import_comfy_library()
    import folder_paths

    dirs = {name: base / name for name in ("loras", "checkpoints", "output")}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    exts = folder_paths.supported_pt_extensions
    folder_paths.folder_names_and_paths["loras"] = ([str(dirs["loras"])], exts)
    folder_paths.folder_names_and_paths["checkpoints"] = ([str(dirs["checkpoints"])], exts)
    folder_paths.set_output_directory(str(dirs["output"]))
    folder_paths.filename_list_cache.clear()
    return dirs


def load_checkpoint():
    """(MODEL, CLIP, VAE) of the tiny checkpoint, loaded once per process (patchers are cloned
    by every LoRA node, so sharing the base objects is safe)."""
    if "ckpt" not in _LOADED:
        import comfy.sd

        out = comfy.sd.load_checkpoint_guess_config(str(tiny_checkpoint()), output_vae=True, output_clip=True)
        _LOADED["ckpt"] = tuple(out[:3])
    return _LOADED["ckpt"]


def patched_weight(patcher, key: str) -> torch.Tensor:
    """The weight ``key`` of a ModelPatcher with all its patches applied (float64 copy)."""
    import comfy.lora

    sd = patcher.model.state_dict()
    w = sd[key].detach().to(torch.float32).clone()
    if key in patcher.patches:
        w = comfy.lora.calculate_weight(patcher.patches[key], w, key, intermediate_dtype=torch.float32)
    return w.to(torch.float64)
