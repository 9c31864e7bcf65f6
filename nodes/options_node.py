"""Merge options: one node per method in the core's registry, showing only that method's parameters.

Classic (V1) node API, so the pack runs on the ComfyUI 0.3.x trees (no V3 dynamic inputs there):
instead of one merge node with every method's widgets, ``DO-Merge LoRAs`` takes an optional
``options`` input from "Merge options: <method>", generated here from ``domerge_core.list_methods()``
(a method added to the registry gets its node without edits here).
"""
from __future__ import annotations

import re
from typing import Any, Dict, Tuple

import domerge_core

from . import comfy_glue as glue
from .lora_list import CATEGORY

OPTIONS = "DOMERGE_OPTIONS"       # {"method": name, "params": {name: value}}


def param_input(p: domerge_core.Param) -> Tuple[Any, Dict[str, Any]]:
    """A ComfyUI widget declaration for one registry `Param` (its own method's default)."""
    tip = p.help or p.label or p.name
    if p.type == "bool":
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


def node_id(method: str) -> str:
    return "DomergeOptions_" + re.sub(r"[^0-9A-Za-z_]", "_", method)


def make_options_node(spec) -> type:
    """The options node class of one registered method."""
    params = list(spec.all_params())

    def INPUT_TYPES(cls):
        return {"required": {p.name: param_input(p) for p in params}}

    def build(self, **values):
        unknown = set(values) - {p.name for p in params}
        if unknown:
            raise glue.NodeInputError(f"unknown parameters for {spec.name}: {', '.join(sorted(unknown))}")
        return ({"method": spec.name, "params": dict(values)},)

    return type(node_id(spec.name), (), {
        "DESCRIPTION": (f"Parameters of the merge method '{spec.name}' ({spec.label}): connect to the "
                        f"'options' input of 'DO-Merge LoRAs' with method {spec.name}. "
                        + (spec.description or "")).strip(),
        "CATEGORY": CATEGORY + "/options",
        "RETURN_TYPES": (OPTIONS,),
        "RETURN_NAMES": ("options",),
        "OUTPUT_TOOLTIPS": (f"Parameters for method '{spec.name}'.",),
        "FUNCTION": "build",
        "INPUT_TYPES": classmethod(INPUT_TYPES),
        "build": build,
        "method": spec.name,
    })


def options_nodes() -> Tuple[Dict[str, type], Dict[str, str]]:
    """(NODE_CLASS_MAPPINGS part, NODE_DISPLAY_NAME_MAPPINGS part) for every registered method."""
    classes, names = {}, {}
    for spec in domerge_core.list_methods():
        cls = make_options_node(spec)
        classes[cls.__name__] = cls
        names[cls.__name__] = f"Merge options: {spec.label} ({spec.name})"
    return classes, names


def method_params(method: str, options: Any) -> Dict[str, Any]:
    """The parameters for ``method`` from an optional options input (none: the method's defaults)."""
    if options is None:
        return {}
    if not isinstance(options, dict) or "method" not in options:
        raise glue.NodeInputError("the 'options' input takes a 'Merge options' node's output")
    if options["method"] != method:
        raise glue.NodeInputError(
            f"the connected options are for method '{options['method']}' but the merge method is "
            f"'{method}': pick '{options['method']}' as method or connect 'Merge options: … ({method})'")
    return dict(options.get("params") or {})
