"""domerge_core — DO-Merging (Decouple and Orthogonalize) and classic merge methods for LoRAs.

The public names below are the whole surface the adapters (CLI, ComfyUI nodes, widgets) use.
They are resolved lazily so that ``import domerge_core`` stays cheap (ComfyUI start-up).
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_PUBLIC = {
    # data model
    "Lora": "lora", "LoraModule": "lora",
    # errors
    "DomergeError": "errors", "LoraFormatError": "errors", "UnsupportedFormatError": "errors",
    "IncompatibleLorasError": "errors", "OutputExistsError": "errors", "MergeCancelled": "errors",
    "InvalidParameterError": "errors", "NumericalError": "errors",
    # files
    "load_lora": "formats", "load_state_dict": "formats", "to_state_dict": "formats",
    "save_lora": "formats", "default_format": "formats", "FORMATS": "formats",
    "check_loadable": "formats.writers", "loadable_formats": "formats.writers",
    "describe": "formats.describe", "check_compatible": "engine.plan", "output_metadata": "metadata",
    "is_text_encoder": "formats.canonical",
    "base_from_pipeline": "formats.base_pipeline",
    # methods and merging
    "Param": "methods.registry", "MethodSpec": "methods.registry", "get_method": "methods",
    "list_methods": "methods", "method_names": "methods", "default_method": "methods",
    "merge": "engine.merge", "MergeResult": "engine.result", "MergeCache": "engine.cache",
    "check_weights": "engine.plan", "check_run_options": "engine.plan",
    "analyze": "engine.analyze", "resolve_device": "devices",
    "ProgressFn": "progress",
}

__all__ = sorted(_PUBLIC) + ["__version__"]


def __getattr__(name: str) -> Any:
    mod = _PUBLIC.get(name)
    if mod is None:
        raise AttributeError(f"module 'domerge_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{mod}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
