"""The one dtype table: safetensors codes, torch names, sizes, scalar formats and the short names
users pick (``fp16``). No torch import here (``domerge inspect`` reads headers without it)."""
from __future__ import annotations

from typing import Dict, Optional, Tuple

# (safetensors code, torch dtype name, bytes, struct format of a scalar or None, short name or None)
TABLE: Tuple[Tuple[str, str, int, Optional[str], Optional[str]], ...] = (
    ("F16", "float16", 2, "<e", "fp16"),
    ("BF16", "bfloat16", 2, None, "bf16"),
    ("F32", "float32", 4, "<f", "fp32"),
    ("F64", "float64", 8, "<d", "fp64"),
    ("I64", "int64", 8, "<q", None),
    ("I32", "int32", 4, "<i", None),
    ("I16", "int16", 2, "<h", None),
    ("I8", "int8", 1, "<b", None),
    ("U8", "uint8", 1, "<B", None),
    ("U16", "uint16", 2, "<H", None),
    ("U32", "uint32", 4, "<I", None),
    ("U64", "uint64", 8, "<Q", None),
    ("BOOL", "bool", 1, None, None),
    ("F8_E4M3", "float8_e4m3fn", 1, None, None),
    ("F8_E5M2", "float8_e5m2", 1, None, None),
)

SIZES: Dict[str, int] = {c: size for c, _, size, _, _ in TABLE}
TORCH_NAMES: Dict[str, str] = {c: t for c, t, _, _, _ in TABLE}
CODES: Dict[str, str] = {t: c for c, t, _, _, _ in TABLE}                 # torch name -> code
SCALAR_FORMATS: Dict[str, str] = {c: f for c, _, _, f, _ in TABLE if f}
FLOAT_CODES: Tuple[str, ...] = tuple(c for c, _, _, _, s in TABLE if s)   # what LoRA factors may be
SHORT: Dict[str, str] = {c: s for c, _, _, _, s in TABLE if s}            # code -> "fp16"
OUTPUT_CHOICES: Tuple[str, ...] = ("fp16", "bf16", "fp32")                # what a user may write


def code_of(dtype) -> Optional[str]:
    """The safetensors code of a torch dtype (or of its name), None if it has none."""
    return CODES.get(str(dtype).replace("torch.", ""))


def short_name(dtype) -> str:
    """``fp16``/``bf16``/``fp32``/``fp64`` for a torch dtype or a safetensors code."""
    code = dtype if dtype in SIZES else code_of(dtype)
    return SHORT.get(code, str(dtype).replace("torch.", ""))


def torch_dtype(name: str):
    """The torch dtype of a short name (``fp16``) or a safetensors code (``F16``)."""
    import torch
    code = next((c for c, s in SHORT.items() if s == name), name)
    return getattr(torch, TORCH_NAMES[code])
