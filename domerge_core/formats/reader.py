"""Build a lazy :class:`~domerge_core.lora.Lora` from a :class:`~.plan.FilePlan`: factor data is read
only when a module's ``loader`` is called (NaN/inf are refused then, naming the key)."""
from __future__ import annotations

from typing import Any, Mapping, Optional, Tuple

import math

import torch

from ..errors import LoraFormatError
from ..lora import Lora, LoraModule
from . import lycoris
from .dtypes import torch_dtype
from .keys import ModuleKeys
from .plan import ModulePlan, PeftScale, TensorSource, plan_modules, read_adapter_config  # noqa: F401

def _finite(t: torch.Tensor, src: TensorSource, key: str) -> torch.Tensor:
    # min/max propagate NaN and show ±inf, and are ~20x faster than isfinite().all() on fp16
    if t.numel() and not all(math.isfinite(float(x)) for x in torch.aminmax(t.reshape(-1))):
        bad = "NaN" if torch.isnan(t).any() else "infinite values"
        raise LoraFormatError(f"factor contains {bad}", file=src.label, key=key)
    return t


def _lycoris_loader(src: TensorSource, g: ModuleKeys, rows: Optional[Tuple[int, int]]):
    roles = {r: k for r, k in g.keys.items() if r != "alpha"}

    def load():
        up, down = lycoris.factors(lambda role: _finite(src.get(roles[role]), src, roles[role]), g.family, roles)
        if rows is not None:
            up = up[rows[0]:rows[1]]
        return up, down

    return load


def _loader(src: TensorSource, g: ModuleKeys, out_f: int, rows: Optional[Tuple[int, int]]):
    if g.family in lycoris.FAMILIES:
        return _lycoris_loader(src, g, rows)
    up_k, down_k, mid_k = g.keys["up"], g.keys["down"], g.keys.get("mid")

    def load():
        up = _finite(src.get(up_k), src, up_k)
        down = _finite(src.get(down_k), src, down_k)
        up = up.reshape(up.shape[0], -1)
        if mid_k:   # Tucker: A' = mid ×₂ down  -> (r, in, kh, kw)
            mid = _finite(src.get(mid_k), src, mid_k)
            d2 = down.reshape(down.shape[0], -1).to(torch.float32)
            a = torch.einsum("ijkl,jr->irkl", mid.to(torch.float32), d2).to(down.dtype)
            down = a.reshape(a.shape[0], -1)
        else:
            down = down.reshape(down.shape[0], -1)
        if rows is not None:
            up = up[rows[0]:rows[1]]
        return up, down

    return load


def build_lora(src: TensorSource, metadata: Optional[Mapping[str, str]] = None, *,
               adapter_config: Optional[Mapping[str, Any]] = None) -> Lora:
    plan = plan_modules(src, metadata, adapter_config=adapter_config)
    modules = {}
    for key, p in plan.modules.items():
        modules[key] = LoraModule(key=key, kind=p.kind, out_features=p.out_features, in_features=p.in_features,
                                  rank=p.rank, scale=p.scale, loader=_loader(src, p.group, p.out_features, p.rows),
                                  kernel_size=p.kernel_size, source_name=p.group.name, dtype=torch_dtype(p.dtype))
    return Lora(modules=modules, format=plan.format, source=src.label, metadata=plan.metadata,
                dtype=torch_dtype(plan.dtype), base_model=plan.base_model, layout=plan.layout)
