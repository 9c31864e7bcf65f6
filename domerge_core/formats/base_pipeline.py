"""A base model's weights from live torch modules: a diffusers pipeline (``pipe.unet``,
``pipe.transformer``, ``pipe.text_encoder``, ``pipe.text_encoder_2``, …) or any ``{component: module}``
mapping — what DoRA / OFT / PEFT DoRA / OFT / BOFT inputs need in a notebook. No diffusers import:
the components are looked up as attributes and read with ``get_submodule(path).weight``.

Canonical keys are ``<component>.<diffusers module path>`` (:mod:`.canonical`); BFL-Flux fused names
are already split into diffusers' own modules there, so every key names one module of the pipeline.
CLIP keys carry ``text_model.``; transformers-5 ``CLIPTextModel`` still has it, a bare encoder
(``CLIPTextTransformer``-like, no ``text_model``) is read without it. Modules wrapped by PEFT (a
pipeline with LoRA adapters loaded, unfused) give their base layer's weight.

``as_base(obj)`` turns what a caller hands over (None, a pipeline, a mapping, a checkpoint path, or a
``fn(key, name)``) into the reader's ``base`` function.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Mapping, Optional

from .canonical import COMPONENTS

BaseFn = Callable[[str, str], Any]


def _components_of(pipe) -> dict:
    import torch
    out = {}
    for comp in COMPONENTS:
        m = getattr(pipe, comp, None)
        if isinstance(m, torch.nn.Module):
            out[comp] = m
    return out


def is_pipeline(obj) -> bool:
    """A diffusers-like pipeline: an object with at least one torch module named like a component."""
    return not isinstance(obj, (str, os.PathLike, Mapping)) and bool(_components_of(obj))


def _module(model, comp: str, path: str):
    if comp.startswith("text_encoder") and path.startswith("text_model.") and not hasattr(model, "text_model"):
        path = path[len("text_model."):]
    try:
        mod = model.get_submodule(path)
    except AttributeError:
        return None
    while hasattr(mod, "base_layer"):        # PEFT tuner layer: the weight it wraps
        mod = mod.base_layer
    return mod


def base_from_modules(components: Mapping[str, Any]) -> BaseFn:
    """``fn(canonical key, module name) -> weight (CPU, detached) or None`` over ``{component: module}``."""
    comps = dict(components)

    def weight(key: str, _name: str = ""):
        comp, dot, path = key.partition(".")
        model = comps.get(comp)
        if model is None or not dot:
            return None
        mod = _module(model, comp, path)
        w = getattr(mod, "weight", None) if mod is not None else None
        if w is None or not hasattr(w, "detach"):
            return None
        return w.detach().to("cpu")

    def shape(key: str, _name: str = ""):
        comp, dot, path = key.partition(".")
        model = comps.get(comp)
        mod = _module(model, comp, path) if model is not None and dot else None
        w = getattr(mod, "weight", None) if mod is not None else None
        return tuple(w.shape) if w is not None and hasattr(w, "shape") else None

    weight.shape = shape      # type: ignore[attr-defined]  (geometry without copying the weight)
    return weight


def base_from_pipeline(pipe) -> BaseFn:
    """The base weights of a diffusers pipeline's ``unet``/``transformer``/``text_encoder*`` modules."""
    comps = _components_of(pipe)
    if not comps:
        raise TypeError(f"{type(pipe).__name__} has none of the components {', '.join(COMPONENTS)}")
    return base_from_modules(comps)


def as_base(obj) -> Optional[BaseFn]:
    """None, a pipeline, a ``{component: module}`` mapping, a checkpoint path (``--base``) or a
    ``fn(key, name)`` -> the reader's ``base`` function (or None)."""
    if obj is None:
        return None
    if isinstance(obj, (str, os.PathLike)):
        from .base import base_weights
        return base_weights(os.fspath(obj))
    if isinstance(obj, Mapping):
        return base_from_modules(obj)
    if is_pipeline(obj):
        return base_from_pipeline(obj)
    if hasattr(obj, "named_modules"):       # one bare model: which component it is is unknown
        raise TypeError(f"base is a bare {type(obj).__name__}; give the pipeline or {{'unet': model, ...}}")
    if callable(obj):
        return obj
    raise TypeError(f"base must be a pipeline, a {{component: module}} dict, a checkpoint path or a function, "
                    f"not {type(obj).__name__}")


def shape_of(base: Optional[BaseFn]) -> Optional[Callable[[str, str], Any]]:
    """``fn(canonical key, module name) -> shape or None`` of a reader ``base`` function: its own
    header-only ``shape`` where it has one (checkpoints, pipelines), else the shape of what it returns."""
    if base is None:
        return None
    shape = getattr(base, "shape", None)
    if shape is not None:
        return shape

    def shape(key: str, name: str):
        t = base(key, name)
        return None if t is None else tuple(t.shape)

    return shape
