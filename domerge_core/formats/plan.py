"""Header-level reading, without torch: tensor names, shapes, dtypes and alpha values in, a plan of
canonical modules out. ``reader.build_lora`` wraps the plan into a lazy :class:`~domerge_core.lora.Lora`;
``inspect.describe`` uses it directly, so ``domerge inspect`` needs neither torch nor tensor data."""
from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from ..errors import LoraFormatError, UnsupportedFormatError
from .keys import ModuleKeys, group_keys
from .names import Mapped, map_name, peft_relative_path

FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
MAX_ALPHA = 1e6          # larger alphas only come from damaged files; their squares overflow fp32 Grams


class TensorSource:
    """What the reader needs from a file or a state dict: shapes and dtypes (safetensors names) up
    front, alpha values and tensors on demand."""

    def __init__(self, label: str, shapes: Mapping[str, Tuple[int, ...]], dtypes: Mapping[str, str],
                 get: Optional[Callable[[str], Any]] = None, scalar: Optional[Callable[[str], float]] = None):
        self.label = label
        self.shapes = shapes
        self.dtypes = dtypes
        self.get = get                # key -> torch.Tensor
        self.scalar = scalar          # key -> float (alphas); defaults to get(key)

    def keys(self):
        return self.shapes.keys()


# ----------------------------------------------------------------------------------------------
# PEFT configs: lora_adapter_metadata (diffusers) / adapter_config.json (PEFT)
# ----------------------------------------------------------------------------------------------
class PeftScale:
    """Scale rule of a LoraConfig: ``lora_alpha / r`` (rsLoRA: ``/ √r``) with per-module patterns."""

    def __init__(self, cfg: Mapping[str, Any]):
        self.alpha = cfg.get("lora_alpha")
        self.r = cfg.get("r")
        self.rslora = bool(cfg.get("use_rslora", False))
        self.rank_pattern = dict(cfg.get("rank_pattern") or {})
        self.alpha_pattern = dict(cfg.get("alpha_pattern") or {})
        if cfg.get("use_dora"):
            raise UnsupportedFormatError("format found: DoRA (use_dora in the adapter config)")

    @staticmethod
    def _match(patterns: Mapping[str, Any], path: str):
        for p, v in patterns.items():
            try:
                if re.match(rf"(.*\.)?({p})$", path):
                    return v
            except re.error:
                if path == p or path.endswith("." + p):
                    return v
        return None

    def scale(self, paths: List[str], rank: int) -> float:
        alpha = None
        for path in paths:
            alpha = self._match(self.alpha_pattern, path)
            if alpha is not None:
                break
        if alpha is None:
            alpha = self.alpha
        if alpha is None:
            return 1.0
        return float(alpha) / (math.sqrt(rank) if self.rslora else rank)


def _configs_from_metadata(metadata: Mapping[str, str]) -> Dict[str, Dict[str, Any]]:
    """``lora_adapter_metadata`` -> {component or "": config}. diffusers writes flat ``unet.r`` keys."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError:
        return {}
    if not isinstance(obj, dict):
        return {}
    out: Dict[str, Dict[str, Any]] = {}
    for k, v in obj.items():
        if isinstance(v, dict) and k in ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3"):
            out.setdefault(k, {}).update(v)
            continue
        comp, dot, name = k.partition(".")
        if dot and comp in ("unet", "transformer", "prior", "text_encoder", "text_encoder_2", "text_encoder_3"):
            out.setdefault(comp, {})[name] = v
        else:
            out.setdefault("", {})[k] = v
    return out


def read_adapter_config(adapter_config) -> Optional[Dict[str, Any]]:
    if adapter_config is None:
        return None
    if isinstance(adapter_config, Mapping):
        return dict(adapter_config)
    path = os.fspath(adapter_config)
    try:
        with open(path, "r", encoding="utf-8") as f:
            obj = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise LoraFormatError(f"cannot read adapter config: {e}", file=path) from None
    if not isinstance(obj, dict):
        raise LoraFormatError("adapter config is not a JSON object", file=path)
    return obj


# ----------------------------------------------------------------------------------------------
# shapes
# ----------------------------------------------------------------------------------------------
def _check_float(src: TensorSource, key: str) -> None:
    dt = src.dtypes.get(key)
    if dt not in FLOAT_DTYPES:
        raise LoraFormatError(f"tensor has dtype {dt}, expected a float type", file=src.label, key=key)


def _module_geometry(src: TensorSource, g: ModuleKeys):
    """(out, in, rank, kernel or None) from shapes only; raises on any inconsistency."""
    up_k, down_k, mid_k = g.keys["up"], g.keys["down"], g.keys.get("mid")
    up, down = tuple(src.shapes[up_k]), tuple(src.shapes[down_k])
    for k in (up_k, down_k) + ((mid_k,) if mid_k else ()):
        _check_float(src, k)
    if len(down) not in (2, 4) or len(up) not in (2, 4):
        raise LoraFormatError(f"unexpected factor shapes up {list(up)} / down {list(down)} for module "
                              f"{g.name!r}", file=src.label, key=up_k if len(up) not in (2, 4) else down_k)
    if len(up) == 4 and tuple(up[2:]) != (1, 1):
        raise UnsupportedFormatError(f"up factor with a {up[2]}x{up[3]} kernel is not supported (module "
                                     f"{g.name!r})", file=src.label, key=up_k)
    rank = down[0]
    if mid_k:
        mid = tuple(src.shapes[mid_k])
        if len(mid) != 4 or mid[0] != up[1] or mid[1] != rank or len(down) != 4 or tuple(down[2:]) != (1, 1):
            raise LoraFormatError(f"inconsistent Tucker shapes up {list(up)} / mid {list(mid)} / down "
                                  f"{list(down)}", file=src.label, key=mid_k)
        rank = mid[0]
        kernel = tuple(mid[2:])
        in_features = down[1] * kernel[0] * kernel[1]
    else:
        kernel = tuple(down[2:]) if len(down) == 4 else None
        in_features = down[1] * (kernel[0] * kernel[1] if kernel else 1)
    if up[1] != rank:
        raise LoraFormatError(f"shape mismatch in module {g.name!r}: up {list(up)} has rank {up[1]} but "
                              f"down {list(down)} has rank {down[0]}", file=src.label, key=up_k)
    if rank == 0:
        raise LoraFormatError(f"module {g.name!r} has rank 0", file=src.label, key=down_k)
    if rank > min(up[0], in_features):
        raise LoraFormatError(f"module {g.name!r} has rank {rank}, more than its layer "
                              f"({up[0]}x{in_features}) can hold: not a LoRA of this layer", file=src.label,
                              key=down_k)
    return up[0], in_features, rank, kernel


def _alpha(src: TensorSource, key: str) -> float:
    shape = tuple(src.shapes[key])
    n = 1
    for s in shape:
        n *= s
    if n != 1:
        raise LoraFormatError(f"alpha must be a scalar, got shape {list(shape)}", file=src.label, key=key)
    v = float(src.scalar(key)) if src.scalar else float(src.get(key).reshape(()).double())
    if not math.isfinite(v):
        raise LoraFormatError(f"alpha is {v} (not finite)", file=src.label, key=key)
    if v <= 0:
        raise LoraFormatError(f"alpha is {v:g}; loaders disagree on what a non-positive alpha means "
                              f"(kohya reads 0 as alpha = rank, ComfyUI as scale 0)", file=src.label, key=key)
    if v > MAX_ALPHA:
        raise LoraFormatError(f"alpha is {v:g}, implausibly large (a LoRA's alpha is of the order of its "
                              f"rank); the file is probably damaged", file=src.label, key=key)
    return v


@dataclass
class ModulePlan:
    key: str
    kind: str
    out_features: int
    in_features: int
    rank: int
    scale: float
    kernel_size: Optional[Tuple[int, ...]]
    group: ModuleKeys                     # the file's keys of this module
    rows: Optional[Tuple[int, int]]       # up-row range (a split of a fused module) or None
    dtype: str                            # safetensors dtype name of the factors


@dataclass
class FilePlan:
    modules: Dict[str, ModulePlan]
    format: str
    layout: Dict[str, str]
    metadata: Dict[str, str]
    dtype: str
    base_model: Optional[str]


def plan_modules(src: TensorSource, metadata: Optional[Mapping[str, str]] = None, *,
                 adapter_config: Optional[Mapping[str, Any]] = None) -> FilePlan:
    metadata = dict(metadata or {})
    groups = group_keys(src.keys(), src.label)
    cfgs = _configs_from_metadata(metadata)
    if adapter_config:
        cfgs.setdefault("", {}).update(adapter_config)
    scales = {k: PeftScale(v) for k, v in cfgs.items()}
    modules: Dict[str, ModulePlan] = {}
    formats: Counter = Counter()
    layout: Dict[str, str] = {}
    bases: Counter = Counter()
    dtypes: Counter = Counter()
    for g in groups:
        out_f, in_f, rank, kernel = _module_geometry(src, g)
        mapped: Mapped = map_name(g.name, g.family, out_f)
        formats[mapped.format] += 1
        for k, v in mapped.layout.items():
            layout.setdefault(k, v)
        if mapped.base_hint:
            bases[mapped.base_hint] += 1
        if "alpha" in g.keys:
            scale = _alpha(src, g.keys["alpha"]) / rank
        elif g.family == "ab" and scales:
            comp = mapped.targets[0][0].split(".", 1)[0]
            rule = scales.get(comp) or scales.get("")
            rel = peft_relative_path(g.name)
            paths = [rel, mapped.targets[0][0].split(".", 1)[1]]
            if rel.startswith("text_model."):
                paths.append(rel[len("text_model."):])
            scale = rule.scale(paths, rank) if rule else 1.0
        else:
            scale = 1.0
        dt = src.dtypes[g.keys["up"]]
        dtypes[dt] += 1
        for key, rows in mapped.targets:
            if key in modules:
                raise LoraFormatError(f"two entries map to the same module {key!r}", file=src.label,
                                      key=g.keys["down"])
            modules[key] = ModulePlan(key=key, kind="conv" if kernel else "linear",
                                      out_features=rows[1] - rows[0] if rows else out_f, in_features=in_f,
                                      rank=rank, scale=scale, kernel_size=kernel, group=g, rows=rows, dtype=dt)
    fmt = formats.most_common(1)[0][0]
    layout.setdefault("format", {"comfy": "kohya", "diffusers_old": "diffusers"}.get(fmt, fmt))
    base = guess_base_model(metadata, layout, {k: m.in_features for k, m in modules.items()}, bases)
    return FilePlan(modules=modules, format=fmt, layout=layout, metadata=metadata,
                    dtype=dtypes.most_common(1)[0][0], base_model=base)


def guess_base_model(metadata: Mapping[str, str], layout: Mapping[str, str], in_features: Mapping[str, int],
                     hints: Optional[Counter] = None) -> Optional[str]:
    """"sd1" / "sd2" / "sdxl" / "flux" / "sd3" / "llm" / None, from metadata, then names, then shapes.
    ``in_features``: canonical key -> input width."""
    md = metadata
    v = (md.get("ss_base_model_version") or "").lower()
    arch = (md.get("modelspec.architecture") or "").lower()
    for needle, name in (("sdxl", "sdxl"), ("stable-diffusion-xl", "sdxl"), ("flux", "flux"),
                         ("sd_v1", "sd1"), ("stable-diffusion-v1", "sd1"), ("sd_v2", "sd2"),
                         ("stable-diffusion-v2", "sd2"), ("stable-diffusion-3", "sd3"), ("sd3", "sd3")):
        if needle in v or needle in arch:
            return name
    if hints:
        return hints.most_common(1)[0][0]
    keys = in_features
    if any(k.startswith("text_encoder_2.") for k in keys) or layout.get("unet_names") == "sgm":
        return "sdxl"
    cross = [n for k, n in keys.items() if k.startswith("unet.") and k.endswith("attn2.to_k")]
    if cross:
        c = Counter(cross).most_common(1)[0][0]
        return {768: "sd1", 1024: "sd2", 2048: "sdxl"}.get(c)
    if any(k.startswith("transformer.single_transformer_blocks.") for k in keys):
        return "flux"
    if any(k.startswith("model.") for k in keys):
        return "llm"
    return None
