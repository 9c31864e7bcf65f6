"""Readers and writers for LoRA files (safetensors only — nothing is ever unpickled).

- ``load_lora(path, *, adapter_config=None) -> Lora``: detect the format, read lazily (header now,
  factors when a module's loader is called). ``adapter_config``: a PEFT ``adapter_config.json`` path or
  dict; by default an ``adapter_config.json`` beside a PEFT/diffusers file is used.
- ``load_state_dict(sd, *, source="<state dict>", metadata=None, adapter_config=None) -> Lora``.
- ``to_state_dict(lora, format, *, dtype=None, metadata=None) -> (dict, metadata)``.
- ``save_lora(lora, path, *, format="kohya", dtype=None, metadata=None, overwrite=False, inputs=()) -> str``:
  atomic; refuses to replace an existing file unless ``overwrite``, and never writes over an input.
- ``default_format(lora)``, ``FORMATS``: the writable layouts ("kohya", "diffusers", "peft").

Read: kohya/A1111/LyCORIS LoRA+LoCon (Tucker ``lora_mid`` folded), diffusers/PEFT (``lora_A/lora_B``,
``lora_adapter_metadata``, ``adapter_config.json``, rank/alpha patterns, rsLoRA), generic PEFT
(``base_model.model.``), ComfyUI (``diffusion_model.``, ``text_encoders.``), old diffusers
attention processors, XLabs Flux, LyCORIS LoHa / LoKr / full ``.diff`` (exact low rank, formats/lycoris.py).
Refused with :class:`UnsupportedFormatError`: OFT, DoRA, bias diffs, ...
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Dict, Iterable, Mapping, Optional, Union

from ..errors import LoraFormatError
from .plan import read_adapter_config
from .writers import FORMATS, default_format, to_state_dict

if TYPE_CHECKING:  # torch is imported by the functions that make tensors (``import domerge_core`` stays light)
    import torch

    from ..lora import Lora

__all__ = ["load_lora", "load_state_dict", "to_state_dict", "save_lora", "default_format", "FORMATS"]

PathLike = Union[str, "os.PathLike[str]"]


def load_lora(path: PathLike, *, adapter_config: Union[None, PathLike, Mapping[str, Any]] = None,
              base=None) -> Lora:
    """Read a LoRA file lazily. Errors (:class:`LoraFormatError` and subclasses) name the file and key.
    ``base``: the base model, for inputs whose update depends on it (DoRA, OFT, BOFT, GLoRA; refused
    without): a diffusers pipeline, a ``{component: module}`` dict, a checkpoint path or a function
    ``fn(canonical key, module name) -> weight or None`` (see :func:`~.base_pipeline.as_base`)."""
    from .base_pipeline import as_base
    from .safetensors import LazyFile, adapter_config_beside, read_header, read_scalar, resolve_input
    from .reader import TensorSource, build_lora

    path = resolve_input(path)
    header = read_header(path)
    lazy = LazyFile(path, header)
    src = TensorSource(path, {k: t.shape for k, t in header.tensors.items()},
                       {k: t.dtype for k, t in header.tensors.items()}, lazy.get,
                       scalar=lambda k: read_scalar(header, k, lazy.raw(k)))
    cfg = read_adapter_config(adapter_config)
    if cfg is None:
        beside = adapter_config_beside(path, header.tensors, header.metadata)
        cfg = read_adapter_config(beside) if beside else None
    lora = build_lora(src, header.metadata, adapter_config=cfg, base=as_base(base))
    lora.content_sha256 = lazy.sha256
    return lora


def load_state_dict(sd: Mapping[str, torch.Tensor], *, source: str = "<state dict>",
                    metadata: Optional[Mapping[str, str]] = None,
                    adapter_config: Union[None, PathLike, Mapping[str, Any]] = None, base=None) -> Lora:
    """The same as :func:`load_lora` over in-memory tensors (e.g. ComfyUI's LORA_MODEL dict)."""
    import torch

    from .base_pipeline import as_base

    from .dtypes import code_of
    from .reader import TensorSource, build_lora

    tensors: Dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            raise LoraFormatError(f"value is a {type(v).__name__}, not a tensor", file=source, key=str(k))
        tensors[str(k)] = v
    dtypes = {k: code_of(v.dtype) or str(v.dtype) for k, v in tensors.items()}
    src = TensorSource(source, {k: tuple(v.shape) for k, v in tensors.items()}, dtypes,
                       lambda k: tensors[k].detach())
    return build_lora(src, metadata, adapter_config=read_adapter_config(adapter_config), base=as_base(base))


def save_lora(lora: Lora, path: PathLike, *, format: Optional[str] = "kohya", dtype: Optional[torch.dtype] = None,
              metadata: Optional[Dict[str, str]] = None, overwrite: bool = False,
              inputs: Iterable[str] = ()) -> str:
    """Write atomically in ``format`` (None: :func:`default_format`). Refuses an existing ``path``
    unless ``overwrite`` and always refuses ``path`` == the LoRA's own source or any of ``inputs``."""
    from .safetensors import check_output_path, save_safetensors

    path = os.fspath(path)
    srcs = [lora.source, *inputs]
    check_output_path(path, overwrite=overwrite, inputs=srcs)     # fail before computing anything
    from .writers import plan_state_dict

    tensors, md = plan_state_dict(lora, format, dtype=dtype, metadata=metadata)   # streamed: one module at a time
    return save_safetensors(tensors, path, md, overwrite=overwrite, inputs=srcs)
