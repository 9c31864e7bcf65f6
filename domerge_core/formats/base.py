"""A base model's weights by canonical module key, for adapters whose update depends on them (DoRA).

``base_weights(path)`` reads a safetensors checkpoint's header and returns ``fn(canonical key, module
name) -> tensor or None`` that reads one weight on demand. Names understood:

- SD1.x/SD2.x/SDXL single-file checkpoints (SGM): ``model.diffusion_model.<sgm path>.weight`` (mapped
  to diffusers paths by :func:`canonical.canonical`), ``cond_stage_model.transformer.text_model.…``
  and SDXL ``conditioner.embedders.0.transformer.text_model.…`` (CLIP-L, ``text_encoder``);
- diffusers component files: ``down_blocks.…``/``mid_block.…``/``up_blocks.…`` (UNet),
  ``transformer_blocks.…``/``single_transformer_blocks.…`` (DiT), ``text_model.…`` (text encoder);
- ComfyUI-native names ``diffusion_model.<path>.weight``.

(SDXL's OpenCLIP ``embedders.1`` and BFL-Flux fused weights are not mapped: DoRA modules there get
"base weight not found", naming the key.)
"""
from __future__ import annotations

import os
from typing import Callable, Dict, Optional

from . import canonical as align

_UNET_HEADS = ("down_blocks.", "mid_block.", "up_blocks.", "conv_in", "conv_out", "time_embedding.")
_DIT_HEADS = ("transformer_blocks.", "single_transformer_blocks.", "x_embedder", "context_embedder", "proj_out")


def canonical_of_checkpoint_key(key: str) -> Optional[str]:
    if not key.endswith(".weight"):
        return None
    path = key[: -len(".weight")]
    for prefix in ("model.diffusion_model.", "diffusion_model."):
        if path.startswith(prefix):
            p = path[len(prefix):]
            if align.is_sgm_path(p):
                return align.canonical("unet", p)
            return f"diffusion_model.{p}"
    for prefix in ("cond_stage_model.transformer.", "conditioner.embedders.0.transformer.", "text_encoder."):
        if path.startswith(prefix):
            return align.canonical("text_encoder", path[len(prefix):])
    if path.startswith(_UNET_HEADS):
        return f"unet.{path}"
    if path.startswith(_DIT_HEADS):
        return f"transformer.{path}"
    if path.startswith("text_model."):
        return align.canonical("text_encoder", path)
    return None


def base_weights(path: str) -> Callable[[str, str], "Optional[object]"]:
    from .safetensors import LazyFile, read_header

    path = os.fspath(path)
    header = read_header(path)
    index: Dict[str, str] = {}
    for k in header.tensors:
        c = canonical_of_checkpoint_key(k)
        if c is not None:
            index.setdefault(c, k)
    lazy = LazyFile(path)

    def get(key: str, _name: str = ""):
        k = index.get(key)
        return lazy.get(k) if k is not None else None

    def shape(key: str, _name: str = ""):
        k = index.get(key)
        return tuple(header.tensors[k].shape) if k is not None else None

    get.index = index      # type: ignore[attr-defined]
    get.shape = shape      # type: ignore[attr-defined]  (header-only, for OFT's geometry)
    return get
