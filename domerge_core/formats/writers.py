"""Canonical LoRA -> file layouts (kohya, diffusers, peft).

Every module is written with the scale baked into its factors and one alpha for the whole kohya file
(the most common rank; other ranks get rank/alpha baked into ``up``), so the file means
the same thing to every loader: diffusers 0.42 ignores a per-module alpha that differs from the
file's most common one (research/lora_formats.md §3.4), and PEFT/diffusers files carry no alpha.
The scale is split as √|s| over both factors (sign on up) so fp16/bf16 outputs keep their range.
"""
from __future__ import annotations

import json
import math
from collections import Counter
from typing import TYPE_CHECKING, Dict, Optional, Tuple

from . import canonical as align
from ..errors import LoraFormatError
if TYPE_CHECKING:  # torch is imported where tensors are made: default_format/FORMATS stay light
    import torch

    from ..lora import Lora, LoraModule

FORMATS = ("kohya", "diffusers", "peft")
DROP_METADATA = ("lora_adapter_metadata", "sshs_model_hash", "sshs_legacy_hash", "modelspec.hash_sha256")


def default_format(lora: Lora) -> str:
    """The layout a LoRA is written in when none is asked for: its own (merged: the first input's),
    unless a stock loader would skip part of a file in it (a kohya-named Flux/SD3 LoRA: diffusers does
    not load ``lora_transformer_…``); then ``diffusers``, which ComfyUI and diffusers both load."""
    hint = lora.layout.get("format") if lora.layout else None
    if hint in FORMATS:
        own = hint
    else:
        own = {"kohya": "kohya", "comfy": "kohya", "diffusers": "diffusers", "diffusers_old": "diffusers",
               "peft": "peft"}.get(lora.format, "peft" if any(k.startswith("model.") for k in lora.modules)
                                   else "kohya")
    if unloadable_reason(lora, own) and not unloadable_reason(lora, "diffusers"):
        return "diffusers"
    return own


def _file_factors(m: LoraModule, dtype: "torch.dtype", loader_scale: float = 1.0
                  ) -> Tuple["torch.Tensor", "torch.Tensor"]:
    """(up, down) with the scale baked in, in their file shapes. ``loader_scale`` is the scale a
    loader will apply on top (kohya: the file's alpha / this module's rank); it is divided out."""
    import torch
    work = torch.float64 if dtype == torch.float64 else torch.float32
    up, down = m.factors(work)
    s = float(m.scale) / loader_scale
    if s != 1.0:
        root = math.sqrt(abs(s))
        up = up * (math.copysign(root, s))
        down = down * root
    if m.kind == "conv" and m.kernel_size:
        kh, kw = m.kernel_size
        up = up.reshape(m.out_features, m.rank, 1, 1)
        down = down.reshape(m.rank, m.in_features // (kh * kw), kh, kw)
    return up.to(dtype).contiguous(), down.to(dtype).contiguous()


def _components(lora: Lora):
    return Counter(k.split(".", 1)[0] for k in lora.modules)


def kohya_module_name(key: str, lora: Lora) -> str:
    comp, path = key.split(".", 1)
    lay = lora.layout or {}
    if comp == "unet":
        if lay.get("unet_names") == "sgm":
            path = align.diffusers_to_sgm(path, int(lay.get("layers_per_block", 2)))
        return "lora_unet_" + path.replace(".", "_")
    if comp == "text_encoder":
        two = any(k.startswith("text_encoder_2.") for k in lora.modules) or lay.get("te_prefix_text_encoder") == "lora_te1"
        return ("lora_te1_" if two else "lora_te_") + path.replace(".", "_")
    if comp == "text_encoder_2":
        return "lora_te2_" + path.replace(".", "_")
    if comp == "text_encoder_3":
        return "lora_te3_" + path.replace(".", "_")
    if comp == "transformer":
        return "lora_transformer_" + path.replace(".", "_")
    if comp == "prior":
        return "lora_prior_unet_" + path.replace(".", "_")
    if comp == "diffusion_model":
        return "lora_unet_" + path.replace(".", "_")
    if comp == "text_encoders":
        return key          # ComfyUI-native dotted name: ComfyUI reads "<key>.lora_down.weight"
    raise LoraFormatError(f"the kohya layout has no name for module {key!r} (a generic PEFT adapter); "
                          f"write it with format 'peft'", file=lora.source, key=key)


_ATTN_OLD = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out.0": "to_out"}


def diffusers_unet_names(key: str) -> Optional[Tuple[str, str]]:
    """(up key, down key) of a UNet module (SD1.x/SDXL) in the diffusers layout both ComfyUI's stock
    LoraLoader and diffusers' ``load_lora_weights`` read completely, else None.

    ComfyUI's key map knows UNet attention only under the attention-processor names
    (``…attn1.processor.to_q``, ``…processor.to_out``), so ``unet.…attn1.to_q.lora_A.weight`` is
    skipped there ("lora key not loaded"). diffusers converts the processor layout (``_lora.up``,
    ``.lora.up``, ``.processor.``) when the file's first UNet key is not ``lora_A``, so the whole UNet
    is written in it: attention as ``…processor.to_q_lora.up.weight``, the rest as ``….lora.up.weight``.
    """
    comp, path = key.split(".", 1)
    if comp != "unet":
        return None
    head, _, last = path.rpartition(".")
    if path.endswith(".to_out.0"):
        head, last = path[: -len(".to_out.0")], "to_out.0"
    if last in _ATTN_OLD and head.rsplit(".", 1)[-1].startswith("attn"):
        base = f"unet.{head}.processor.{_ATTN_OLD[last]}_lora"
    else:
        base = f"unet.{path}.lora"
    return base + ".up.weight", base + ".down.weight"


def diffusers_module_name(key: str, lora: Lora) -> str:
    comp, path = key.split(".", 1)
    if comp == "model":
        return "base_model.model." + path
    return key


# components whose loaders (ComfyUI's LoraLoader, diffusers' load_lora_weights) know no PEFT
# ``base_model.model.`` names: a "peft" file of them loads as nothing there
DIFFUSION_COMPONENTS = align.PIPELINE_COMPONENTS + align.NATIVE_COMPONENTS


def unloadable_reason(lora: Lora, format: str) -> Optional[str]:
    """Why a file of ``lora`` in ``format`` would not load in ComfyUI's stock loader or diffusers'
    ``load_lora_weights`` (None: it loads in both). The save surfaces (ComfyUI node, panel, CLI)
    refuse such a format instead of writing a file that silently does nothing."""
    if format == "peft":
        comps = sorted({k.split(".", 1)[0] for k in lora.modules} & set(DIFFUSION_COMPONENTS))
        if comps:
            return (f"format 'peft' (base_model.model.… names) does not load in ComfyUI's LoRA loaders nor "
                    f"in diffusers' load_lora_weights for a diffusion-model LoRA ({', '.join(comps)}): "
                    f"every key would be skipped. Use 'kohya' (ComfyUI, A1111/Forge, diffusers) or "
                    f"'diffusers'")
    if format == "kohya" and any(k.startswith("transformer.") for k in lora.modules):
        return ("format 'kohya' writes the DiT (Flux, SD3) modules as lora_transformer_…, which ComfyUI loads but "
                "diffusers' load_lora_weights does not load (it rejects those names); use 'diffusers' "
                "(transformer.… lora_A/lora_B), which both load")
    return None


def check_loadable(lora: Lora, format: Optional[str]) -> str:
    """``format`` (None: the LoRA's default) if `unloadable_reason` has nothing against it, else
    raises :class:`LoraFormatError` with the reason."""
    format = format or default_format(lora)
    why = unloadable_reason(lora, format)
    if why:
        raise LoraFormatError(why, file=lora.source)
    return format


def loadable_formats(lora: Lora) -> Tuple[str, ...]:
    """The FORMATS a file of ``lora`` can be written in and load completely."""
    return tuple(f for f in FORMATS if unloadable_reason(lora, f) is None)


def peft_module_name(key: str, lora: Lora) -> str:
    comps = _components(lora)
    comp, path = key.split(".", 1)
    if len(comps) == 1 and comp in ("unet", "transformer", "model"):
        return "base_model.model." + path
    if comp == "model":
        return "base_model.model." + path
    return "base_model.model." + key


def _kohya_metadata(lora: Lora, ranks: Counter, extra: Optional[Dict[str, str]], alpha: int) -> Dict[str, str]:
    md = {k: v for k, v in (lora.metadata or {}).items() if k not in DROP_METADATA}
    if extra is not None:
        md = {k: v for k, v in extra.items() if k not in ("lora_adapter_metadata",)}
    uniform = len(ranks) == 1
    r = str(next(iter(ranks))) if uniform else "Dynamic"
    md["ss_network_dim"] = r
    md["ss_network_alpha"] = r if uniform else str(alpha)   # one alpha for every module
    args = md.get("ss_network_args")
    if args:
        try:
            a = json.loads(args)
            if isinstance(a, dict) and "conv_alpha" in a and "conv_dim" in a:
                a["conv_alpha"] = str(alpha)
                md["ss_network_args"] = json.dumps(a)
        except json.JSONDecodeError:
            pass
    return {str(k): str(v) for k, v in md.items()}


class LazyTensor:
    """A tensor known by shape and dtype, computed when the writer reaches it: the streaming
    writer (`io.write_safetensors`) never holds the whole output in memory."""
    __slots__ = ("shape", "dtype", "_make")

    def __init__(self, shape, dtype, make):
        self.shape, self.dtype, self._make = tuple(shape), dtype, make

    def numel(self) -> int:
        return math.prod(self.shape)

    def element_size(self) -> int:
        import torch
        return torch.empty((), dtype=self.dtype).element_size()

    def materialize(self):
        return self._make()


def plan_state_dict(lora: Lora, format: Optional[str] = None, *, dtype: Optional["torch.dtype"] = None,
                    metadata: Optional[Dict[str, str]] = None) -> Tuple[Dict[str, LazyTensor], Dict[str, str]]:
    """(lazy tensors, metadata) of ``lora`` in layout ``format``; see `to_state_dict`. Each module's
    factors are computed once, when the first of its tensors is materialized."""
    import torch

    format = format or default_format(lora)
    if format not in FORMATS:
        raise LoraFormatError(f"unknown output format {format!r}; choose one of {', '.join(FORMATS)}")
    from .dtypes import FLOAT_CODES, code_of
    if dtype is not None and code_of(dtype) not in FLOAT_CODES:
        from ..errors import InvalidParameterError
        raise InvalidParameterError(f"cannot write LoRA factors as {dtype}: choose torch.float16, bfloat16, "
                                    f"float32 or float64 (what the readers accept)", file=lora.source)
    if format is not None and not isinstance(format, str):
        raise LoraFormatError(f"format must be one of {', '.join(FORMATS)}, not {type(format).__name__}")
    dtype = dtype or lora.dtype or torch.float32
    if not len(lora):
        raise LoraFormatError("nothing to write: the LoRA has no modules", file=lora.source)
    namer = {"kohya": kohya_module_name, "diffusers": diffusers_module_name, "peft": peft_module_name}[format]
    plan: Dict[str, LazyTensor] = {}
    ranks: Counter = Counter()
    # kohya: ONE alpha for the whole file (the most common rank, larger on ties) and rank/alpha baked
    # into the factors: diffusers 0.42 silently ignores an attention module's alpha when it differs
    # from the file's most common one, so per-module alpha = rank breaks merges of mixed ranks.
    rank_counts = Counter(m.rank for m in lora)
    file_alpha = max(rank_counts, key=lambda r: (rank_counts[r], r))
    pending: Dict[str, Dict[str, "torch.Tensor"]] = {}   # module key -> factors not yet written

    def factor(m: LoraModule, which: str, loader_scale: float):
        def make():
            if m.key not in pending:
                up, down = _file_factors(m, dtype, loader_scale)
                if not all(math.isfinite(float(x)) for t in (up, down) if t.numel()
                           for x in torch.aminmax(t.reshape(-1))):
                    raise LoraFormatError(f"module {m.key} does not fit in {str(dtype).replace('torch.', '')} "
                                          f"(values overflow); write it with a wider dtype (fp32)",
                                          file=lora.source, key=m.source_name or m.key)
                pending[m.key] = {"up": up, "down": down}
            parts = pending[m.key]
            t = parts.pop(which)
            if not parts:
                del pending[m.key]
            return t
        return make

    for m in lora:
        name = namer(m.key, lora)
        loader_scale = file_alpha / m.rank if format == "kohya" else 1.0
        ranks[m.rank] += 1
        if format == "kohya":
            up_key, down_key = name + ".lora_up.weight", name + ".lora_down.weight"
        elif format == "diffusers" and diffusers_unet_names(m.key):
            up_key, down_key = diffusers_unet_names(m.key)
        else:
            up_key, down_key = name + ".lora_B.weight", name + ".lora_A.weight"
        if up_key in plan:
            raise LoraFormatError(f"two modules map to the same {format} name {name!r}", file=lora.source,
                                  key=m.key)
        conv = m.kind == "conv" and m.kernel_size
        up_shape = (m.out_features, m.rank, 1, 1) if conv else (m.out_features, m.rank)
        down_shape = (m.rank, *m.weight_shape[1:]) if conv else (m.rank, m.in_features)
        if format == "kohya":
            plan[name + ".alpha"] = LazyTensor((), torch.float32,
                                               lambda a=float(file_alpha): torch.tensor(a, dtype=torch.float32))
        plan[down_key] = LazyTensor(down_shape, dtype, factor(m, "down", loader_scale))
        plan[up_key] = LazyTensor(up_shape, dtype, factor(m, "up", loader_scale))
    md = _kohya_metadata(lora, ranks, metadata, file_alpha)
    if format != "kohya":
        md.setdefault("format", "pt")
    return plan, md


def to_state_dict(lora: Lora, format: Optional[str] = None, *, dtype: Optional["torch.dtype"] = None,
                  metadata: Optional[Dict[str, str]] = None) -> Tuple[Dict[str, "torch.Tensor"], Dict[str, str]]:
    """(tensors, metadata) of ``lora`` in layout ``format`` ("kohya" | "diffusers" | "peft"; None: the
    LoRA's default). ``dtype`` defaults to the LoRA's dtype. ``metadata`` replaces the carried metadata
    (``ss_network_dim``/``ss_network_alpha`` are always set to what is written)."""
    plan, md = plan_state_dict(lora, format, dtype=dtype, metadata=metadata)
    return {k: v.materialize() for k, v in plan.items()}, md


def adapter_config(lora: Lora) -> Dict[str, object]:
    """A PEFT ``adapter_config.json`` for a file written with format "peft": the scale is baked into
    the factors, so ``lora_alpha = r`` (rank_pattern/alpha_pattern for modules of another rank)."""
    ranks = Counter(m.rank for m in lora)
    r = ranks.most_common(1)[0][0]
    rel = {m.key: peft_module_name(m.key, lora)[len("base_model.model."):] for m in lora}
    return {
        "peft_type": "LORA", "r": r, "lora_alpha": r, "use_rslora": False, "bias": "none",
        "fan_in_fan_out": False, "init_lora_weights": True,
        "target_modules": sorted({p for p in rel.values()}),
        "rank_pattern": {rel[m.key]: m.rank for m in lora if m.rank != r},
        "alpha_pattern": {rel[m.key]: m.rank for m in lora if m.rank != r},
    }
