"""Module names as written in files -> canonical keys (``<component>.<diffusers path>``).

Each function returns a :class:`Mapped`: the canonical key, the format label the name belongs to,
layout hints for writers, and for fused modules (kohya/BFL Flux, SD3 qkv) or modules whose halves
diffusers swaps (``final_layer.adaLN_modulation.1`` -> ``norm_out.linear``) the rows of the up factor
each target takes (:data:`canonical.Rows`: ordered ranges).

``hint`` ("flux" / "sd3" / None, :func:`canonical.file_hint` of the whole file) decides the models'
modules outside the blocks, whose names alone could belong to another model.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from . import canonical as align

KOHYA_PREFIXES = (  # longest first
    ("lora_prior_unet_", "prior"),
    ("lora_transformer_", "transformer"),
    ("lora_unet_", "unet"),
    ("lora_te1_", "text_encoder"),
    ("lora_te2_", "text_encoder_2"),
    ("lora_te3_", "text_encoder_3"),
    ("lora_te_", "text_encoder"),
    ("lycoris_", "transformer"),
)
DOTTED_COMPONENTS = align.PIPELINE_COMPONENTS
_UNET_HEADS = ("down_blocks.", "mid_block.", "up_blocks.", "conv_in", "conv_out", "time_embedding.",
               "add_embedding.")
_DIT_HEADS = ("transformer_blocks.", "single_transformer_blocks.", "x_embedder", "context_embedder",
              "time_text_embed.", "proj_out", "norm_out.", "pos_embed.")
COMFY_TE = {"clip_l": "text_encoder", "clip_g": "text_encoder_2"}


@dataclass
class Mapped:
    targets: List[Tuple[str, align.Rows]]   # (canonical key, its rows of the up factor or None: all)
    format: str
    layout: Dict[str, str] = field(default_factory=dict)
    base_hint: Optional[str] = None


def _one(key: str, fmt: str, layout=None, base=None) -> Mapped:
    return Mapped([(key, None)], fmt, dict(layout or {}), base)


def _split(t, out_features: int, fmt: str, layout, base: Optional[str]) -> Mapped:
    return Mapped([(k, rows if rows != ((0, out_features),) else None) for k, rows in t], fmt, layout, base)


def _split_flux(path: str, out_features: int, fmt: str, layout) -> Optional[Mapped]:
    t = align.flux_targets(path, out_features)
    if t is None:
        return None
    return _split(t, out_features, fmt, dict(layout, transformer_names="bfl"), "flux")


def _unet_like(path: str, fmt: str, layout, out_features: int, component_hint: str = "unet",
               in_features: Optional[int] = None, hint: Optional[str] = None) -> Mapped:
    """A diffusion-model path in SGM, BFL-Flux, SD3-MMDiT or diffusers naming."""
    top = align.dit_top_targets(path, out_features, in_features, hint)
    if top is not None:
        names = "bfl" if hint == "flux" else "mmdit"
        return _split(top, out_features, fmt, dict(layout, transformer_names=names), hint)
    if align.is_flux_path(path):
        m = _split_flux(path, out_features, fmt, layout)
        if m is not None:
            return m
        return _one(f"diffusion_model.{path}", fmt, layout, "flux")
    if align.is_mmdit_path(path):
        base = "sd3" if path.startswith("joint_blocks.") else None
        t = align.mmdit_targets(path, out_features, in_features)
        if t is None:
            return _one(f"diffusion_model.{path}", fmt, layout, base)
        return _split(t, out_features, fmt, dict(layout, transformer_names="mmdit"), base)
    if align.is_sgm_path(path):
        return _one(align.canonical("unet", path), fmt, dict(layout, unet_names="sgm"))
    if path.startswith(_UNET_HEADS):
        return _one(f"unet.{path}", fmt, dict(layout, unet_names="diffusers"))
    if component_hint == "transformer" or path.startswith(_DIT_HEADS):
        return _one(f"transformer.{path}", fmt, layout)
    return _one(f"diffusion_model.{path}", fmt, layout)


def kohya_name(name: str, out_features: int, in_features: Optional[int] = None,
               hint: Optional[str] = None) -> Optional[Mapped]:
    """``lora_unet_…`` / ``lora_te1_…`` -> canonical; None when the name has no kohya prefix."""
    for prefix, comp in KOHYA_PREFIXES:
        if name.startswith(prefix):
            flat = name[len(prefix):]
            layout = {"format": "kohya"}
            if comp in align.TE_COMPONENTS:
                layout["te_prefix_" + comp] = prefix[:-1]
                return _one(align.canonical(comp, align.kohya_path(flat)), "kohya", layout)
            path = align.kohya_path(flat)
            if comp == "unet" or (comp == "transformer" and (align.is_flux_path(path) or align.is_mmdit_path(path)
                                                              or align.dit_top_targets(path, out_features, in_features,
                                                                                       hint))):
                return _unet_like(path, "kohya", layout, out_features, in_features=in_features, hint=hint)
            return _one(f"{comp}.{path}", "kohya", layout)
    return None


_OLD_TE_ATTN = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}


def old_diffusers_name(name: str) -> str:
    """Old attention-processor module names -> module paths:
    ``…attn1.processor.to_q`` -> ``…attn1.to_q``, ``to_out`` -> ``to_out.0``;
    text encoder ``self_attn.to_q`` -> ``self_attn.q_proj``."""
    parts = name.split(".")
    if "processor" in parts:
        parts.remove("processor")
    last = parts[-1]
    is_te = any(p.startswith("text_encoder") or p == "text_model" for p in parts[:2]) or "self_attn" in parts
    if is_te and last in _OLD_TE_ATTN and len(parts) > 1 and parts[-2] == "self_attn":
        parts[-1] = _OLD_TE_ATTN[last]
    elif last == "to_out":
        parts.append("0")
    return ".".join(parts)


def dotted_name(name: str, family: str, out_features: int, in_features: Optional[int] = None,
                hint: Optional[str] = None) -> Mapped:
    """Dotted names: diffusers (``unet.``, ``text_encoder.``, ``transformer.``), PEFT
    (``base_model.model.``), ComfyUI (``diffusion_model.``, ``text_encoders.``), old diffusers."""
    fmt_ab = "diffusers"
    if family == "old":
        name = old_diffusers_name(name)
        fmt_ab = "diffusers_old"
    elif family == "down_up":
        fmt_ab = "comfy"
    if name.startswith("base_model.model."):
        rest = name[len("base_model.model."):]
        layout = {"format": "peft"}
        head = rest.split(".", 1)[0]
        if head in DOTTED_COMPONENTS and "." in rest:
            comp, path = rest.split(".", 1)
            layout["peft_components"] = "prefixed"
            return _one(align.canonical(comp, path), "peft", layout)
        if rest.startswith(_UNET_HEADS) or align.is_sgm_path(rest) or align.is_mmdit_path(rest) \
                or align.dit_top_targets(rest, out_features, in_features, hint):
            m = _unet_like(rest, "peft", layout, out_features, in_features=in_features, hint=hint)
            m.layout["peft_components"] = "unet"
            return m
        if rest.startswith(_DIT_HEADS):
            layout["peft_components"] = "transformer"
            return _one(f"transformer.{rest}", "peft", layout)
        return _one(f"model.{rest}", "peft", layout, "llm")
    if name.startswith("diffusion_model."):
        path = name[len("diffusion_model."):]
        return _unet_like(path, "comfy", {"format": "kohya", "comfy_names": "1"}, out_features,
                          in_features=in_features, hint=hint)
    if name.startswith("text_encoders."):
        rest = name[len("text_encoders."):]
        enc, _, path = rest.partition(".")
        if path.startswith("transformer."):
            path = path[len("transformer."):]
        comp = COMFY_TE.get(enc)
        if comp:
            return _one(align.canonical(comp, path), "comfy", {"format": "kohya", "comfy_names": "1"})
        return _one(f"text_encoders.{rest}", "comfy", {"format": "kohya", "comfy_names": "1"})
    head, _, path = name.partition(".")
    layout = {"format": "diffusers" if fmt_ab != "comfy" else "kohya"}
    if head in DOTTED_COMPONENTS and path:
        if head == "unet" or head == "transformer":
            return _unet_like(path, fmt_ab, layout, out_features, component_hint=head, in_features=in_features,
                              hint=hint)
        return _one(align.canonical(head, path), fmt_ab, layout)
    if name.startswith(_UNET_HEADS):            # oldest diffusers files: UNet keys without a prefix
        return _unet_like(name, fmt_ab, layout, out_features)
    if name.startswith(("text_model.", "encoder.layers.")):
        return _one(align.canonical("text_encoder", name), fmt_ab, layout)
    if name.startswith(_DIT_HEADS):
        return _one(f"transformer.{name}", fmt_ab, layout)
    # a raw PEFT model state dict (no base_model.model. prefix)
    return _one(f"model.{name}", "peft", {"format": "peft", "peft_prefix": ""}, "llm")


_XLABS_DOUBLE = {"qkv_lora1": "img_attn.qkv", "qkv_lora2": "txt_attn.qkv",
                 "proj_lora1": "img_attn.proj", "proj_lora2": "txt_attn.proj"}


def xlabs_name(name: str, out_features: int) -> Mapped:
    """XLabs Flux processor LoRAs -> the BFL module they patch (ComfyUI's USO converter's rule):
    double ``qkv_lora1/2`` -> ``img_attn/txt_attn.qkv`` (split q/k/v), ``proj_lora1/2`` -> ``…attn.proj``;
    single ``qkv_lora`` -> the q/k/v rows of ``linear1``, ``proj_lora`` -> ``linear2``."""
    kind, i, _, sub = name.split(".")
    layout = {"format": "kohya"}
    if kind == "double_blocks" and sub in _XLABS_DOUBLE:
        return _unet_like(f"double_blocks.{i}.{_XLABS_DOUBLE[sub]}", "xlabs", layout, out_features)
    block = f"transformer.single_transformer_blocks.{i}"
    if sub == "qkv_lora" and out_features % 3 == 0:
        h = out_features // 3
        return Mapped([(f"{block}.attn.to_{x}", ((j * h, (j + 1) * h),)) for j, x in enumerate("qkv")], "xlabs",
                      dict(layout, transformer_names="bfl"), "flux")
    if sub == "proj_lora":
        return _one(f"{block}.proj_out", "xlabs", dict(layout, transformer_names="bfl"), "flux")
    return _one(f"diffusion_model.{kind}.{i}.{sub}", "xlabs", layout, "flux")


def map_name(name: str, family: str, out_features: int, in_features: Optional[int] = None,
             hint: Optional[str] = None) -> Mapped:
    """``in_features`` (optional) tells SD3's pre-only context modulation (2 chunks) from the others;
    ``hint``: the file's :func:`canonical.file_hint` (Flux's / SD3's modules outside the blocks)."""
    if family == "xlabs":
        return xlabs_name(name, out_features)
    if "." not in name or name.startswith(tuple(p for p, _ in KOHYA_PREFIXES)):
        m = kohya_name(name, out_features, in_features, hint)
        if m is not None:
            if family == "ab":             # kohya names with lora_A/B (seen from some trainers)
                m.format = "kohya"
            return m
    return dotted_name(name, family, out_features, in_features, hint)


def peft_relative_path(name: str) -> str:
    """The module path as PEFT sees it inside its model (for rank_pattern/alpha_pattern matching)."""
    for p in ("base_model.model.",):
        if name.startswith(p):
            name = name[len(p):]
    head, _, rest = name.partition(".")
    if head in DOTTED_COMPONENTS and rest:
        return rest
    return name
