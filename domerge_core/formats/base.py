"""A base model's weights by canonical module key, for adapters whose update depends on them (DoRA, OFT).

``base_weights(path)`` reads a safetensors checkpoint's header and returns ``fn(canonical key, module
name) -> tensor or None`` that reads one weight on demand (a fused weight is read alone and narrowed to
the target's rows: never the whole checkpoint). Names understood:

- SD1.x/SD2.x/SDXL single-file checkpoints (SGM): ``model.diffusion_model.<sgm path>.weight`` (mapped
  to diffusers paths by :func:`canonical.canonical`), ``cond_stage_model.transformer.text_model.…``
  and SDXL ``conditioner.embedders.0.transformer.text_model.…`` (CLIP-L, ``text_encoder``);
- SDXL's OpenCLIP ``conditioner.embedders.1.model.transformer.resblocks.N.…`` (``text_encoder_2``) as
  ComfyUI's ``clip_text_transformers_convert`` converts it: ``attn.in_proj_weight`` rows 0:d / d:2d /
  2d:3d -> ``self_attn.q_proj`` / ``k_proj`` / ``v_proj``, ``attn.out_proj`` -> ``self_attn.out_proj``,
  ``mlp.c_fc`` -> ``mlp.fc1``, ``mlp.c_proj`` -> ``mlp.fc2``;
- BFL Flux and SD3/SD3.5 fused weights (``model.diffusion_model.…``, ``diffusion_model.…`` or a
  transformer-only file's bare ``double_blocks.…`` / ``joint_blocks.…``): each canonical split target
  (``transformer.transformer_blocks.N.attn.to_q``…) gets its rows, by the same name mapping the
  LoRA reader uses (`names.map_name`: :func:`canonical.flux_targets` / :func:`canonical.mmdit_targets`,
  Flux's ``img_in``… and ``final_layer.adaLN_modulation.1`` -> ``norm_out.linear`` with its halves
  swapped, decided for the whole checkpoint by :func:`canonical.file_hint`);
- SD3 single-file text encoders ``text_encoders.clip_l`` / ``clip_g.transformer.…``;
- diffusers component files: ``down_blocks.…``/``mid_block.…``/``up_blocks.…`` (UNet),
  ``transformer_blocks.…``/``single_transformer_blocks.…`` (DiT), ``text_model.…`` (text encoder);
- ComfyUI-native names ``diffusion_model.<path>.weight``.
"""
from __future__ import annotations

import math
import os
import re
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from . import canonical as align
from .canonical import Rows, rows_count, take_rows

_UNET_HEADS = ("down_blocks.", "mid_block.", "up_blocks.", "conv_in", "conv_out", "time_embedding.")
_DIT_HEADS = ("transformer_blocks.", "single_transformer_blocks.", "x_embedder", "context_embedder", "proj_out",
              "pos_embed.", "time_text_embed.", "norm_out.")
_BARE_NATIVE = ("double_blocks.", "single_blocks.", "joint_blocks.")       # transformer-only BFL / SD3 files
_OPENCLIP = re.compile(r"^conditioner\.embedders\.1\.model\.transformer\.resblocks\.(\d+)\.(.+)$")
_OPENCLIP_MAP = {"attn.out_proj.weight": "self_attn.out_proj", "mlp.c_fc.weight": "mlp.fc1",
                 "mlp.c_proj.weight": "mlp.fc2"}
_SD3_TE = {"text_encoders.clip_l.transformer.": "text_encoder", "text_encoders.clip_g.transformer.": "text_encoder_2"}

def _native(path: str, shape: Sequence[int], hint: Optional[str]) -> List[Tuple[str, Rows]]:
    """A diffusion-model path of a checkpoint -> canonical targets, by the LoRA name mapping."""
    from .names import map_name
    if len(shape) < 2:
        return []
    in_f = 1
    for s in shape[1:]:
        in_f *= int(s)
    return list(map_name("diffusion_model." + path, "down_up", int(shape[0]), in_f, hint).targets)


def _dit_top(path: str, shape: Sequence[int], hint: Optional[str]) -> bool:
    """A Flux / SD3 module outside the blocks (``img_in``, ``final_layer.…``) of a checkpoint of that model."""
    return bool(hint) and len(shape) >= 2 and align.dit_top_targets(
        path, int(shape[0]), math.prod(int(x) for x in shape[1:]), hint) is not None


def canonical_targets(key: str, shape: Sequence[int], hint: Optional[str] = None) -> List[Tuple[str, Rows]]:
    """A checkpoint tensor key (and its shape) -> [(canonical module key, its rows of the tensor or None)].
    ``hint``: the checkpoint's :func:`canonical.file_hint` ("flux" / "sd3": its modules outside the
    blocks get diffusers names too)."""
    m = _OPENCLIP.match(key)
    if m:
        i, rest = m.groups()
        layer = f"text_encoder_2.text_model.encoder.layers.{i}"
        if rest == "attn.in_proj_weight":
            if not shape or shape[0] % 3:
                return []
            d = int(shape[0]) // 3
            return [(f"{layer}.self_attn.{x}_proj", ((j * d, (j + 1) * d),)) for j, x in enumerate("qkv")]
        if rest in _OPENCLIP_MAP:
            return [(f"{layer}.{_OPENCLIP_MAP[rest]}", None)]
        return []
    if not key.endswith(".weight"):
        return []
    path = key[: -len(".weight")]
    for prefix in ("model.diffusion_model.", "diffusion_model."):
        if path.startswith(prefix):
            p = path[len(prefix):]
            if align.is_sgm_path(p):
                return [(align.canonical("unet", p), None)]
            if align.is_flux_path(p) or align.is_mmdit_path(p) or _dit_top(p, shape, hint):
                return _native(p, shape, hint)
            return [(f"diffusion_model.{p}", None)]
    if path.startswith(_BARE_NATIVE) or _dit_top(path, shape, hint):
        return _native(path, shape, hint)
    for prefix in ("cond_stage_model.transformer.", "conditioner.embedders.0.transformer.", "text_encoder."):
        if path.startswith(prefix):
            return [(align.canonical("text_encoder", path[len(prefix):]), None)]
    for prefix, comp in _SD3_TE.items():
        if path.startswith(prefix):
            return [(align.canonical(comp, path[len(prefix):]), None)]
    if path.startswith(_UNET_HEADS):
        return [(f"unet.{path}", None)]
    if path.startswith(_DIT_HEADS):
        return [(f"transformer.{path}", None)]
    if path.startswith("text_model."):
        return [(align.canonical("text_encoder", path), None)]
    return []


def canonical_of_checkpoint_key(key: str) -> Optional[str]:
    """The canonical key of a checkpoint weight that maps to one whole module (None: a fused weight or
    an unknown name; see :func:`canonical_targets`)."""
    t = canonical_targets(key, ())
    return t[0][0] if len(t) == 1 and t[0][1] is None else None


def base_weights(path: str) -> Callable[[str, str], "Optional[object]"]:
    from .safetensors import LazyFile, read_header

    path = os.fspath(path)
    header = read_header(path)
    index: Dict[str, Tuple[str, Rows]] = {}
    hint = align.file_hint(header.tensors)
    for k, info in header.tensors.items():
        for c, rows in canonical_targets(k, tuple(info.shape), hint):
            index.setdefault(c, (k, rows))
    lazy = LazyFile(path)

    def get(key: str, _name: str = ""):
        hit = index.get(key)
        if hit is None:
            return None
        k, rows = hit
        return take_rows(lazy.get(k), rows)

    def shape(key: str, _name: str = ""):
        hit = index.get(key)
        if hit is None:
            return None
        k, rows = hit
        s = tuple(header.tensors[k].shape)
        return (rows_count(rows, s[0]), *s[1:])

    get.index = {c: k for c, (k, _) in index.items()}      # type: ignore[attr-defined]
    get.shape = shape      # type: ignore[attr-defined]  (header-only, for OFT's geometry)
    return get
