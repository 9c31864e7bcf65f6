"""``describe(lora_or_path)``: what ``domerge inspect`` prints.

Given a path, it reads the safetensors header and the alpha scalars only — no tensor data and not
even torch (``formats.plan`` is torch-free) — so a 1052-module SDXL file is described in a fraction
of a second plus Python start-up. Given a loaded :class:`~domerge_core.lora.Lora`, it uses that.
"""
from __future__ import annotations

import os
from collections import Counter
from types import SimpleNamespace
from typing import Any, Dict, Union

from .dtypes import short_name

_META_SHOWN = ("ss_base_model_version", "ss_network_module", "ss_network_dim", "ss_network_alpha",
               "ss_output_name", "modelspec.architecture", "modelspec.title", "modelspec.merged_from")


def _num(x: float):
    return int(x) if float(x).is_integer() else round(float(x), 6)


def _hist(values) -> Dict[str, int]:
    c = Counter(values)
    return {str(k): c[k] for k in sorted(c)}




def _alpha_of(m):
    """The file's alpha where it has one (GLoRA's alpha is not scale × rank: its rank is the exact
    factors' 2r); else the alpha a LoRA's scale implies (PEFT ``lora_alpha``: scale × rank); None for
    base-dependent modules without one (their rank is the dense update's)."""
    a = getattr(m, "alpha", None)
    if a is not None:
        return _num(a)
    if getattr(m, "adapter", "lora") in ("lora", "loha", "lokr"):
        return _num(m.scale * m.rank)
    return None


def _adapter(m) -> str:
    """lora / dora / loha / lokr / diff / oft / boft / glora, and "<type>+dora" for DoRA on LyCORIS."""
    fam = m.group.family if m.group.family in ("loha", "lokr", "diff", "oft", "boft", "glora") else "lora"
    if m.lora_scale is None:
        return fam
    return "dora" if fam == "lora" else f"{fam}+dora"


def _plan_of_file(path: str, base=None):
    """A Lora-like view of a file from its header (canonical modules, scales, shapes), torch-free.
    ``base`` (checkpoint path or function): the base model that OFT/BOFT/GLoRA/DoRA modules need."""
    from .base_pipeline import as_base, shape_of
    from .plan import TensorSource, plan_modules, read_adapter_config
    from .safetensors import adapter_config_beside, open_header, read_scalar, read_tensor_bytes, resolve_input

    path = resolve_input(path)
    h, fd = open_header(path)      # one descriptor for the header and every alpha
    try:
        src = TensorSource(path, {k: t.shape for k, t in h.tensors.items()},
                           {k: t.dtype for k, t in h.tensors.items()},
                           scalar=lambda k: read_scalar(h, k, read_tensor_bytes(h, fd, k)))
        beside = adapter_config_beside(path, h.tensors, h.metadata)
        cfg = read_adapter_config(beside) if beside else None
        p = plan_modules(src, h.metadata, adapter_config=cfg, allow_dora=base is not None,
                         base_shape=shape_of(as_base(base)))
    finally:
        os.close(fd)
    mods = [SimpleNamespace(key=m.key, kind=m.kind, rank=m.rank, scale=m.scale, kernel_size=m.kernel_size,
                            dtype=short_name(m.dtype), out_features=m.out_features,
                            in_features=m.in_features,
                            adapter=_adapter(m), alpha=m.alpha)
            for m in p.modules.values()]
    return SimpleNamespace(modules=mods, format=p.format, base_model=p.base_model, layout=p.layout,
                           metadata=p.metadata, source=path)


def describe(lora: Union["Lora", str, "os.PathLike[str]"], base=None) -> Dict[str, Any]:
    """JSON-ready summary: format, base-model guess, module counts, ranks, alphas/scales, dtype,
    parameters, file. Accepts a loaded :class:`Lora` or a path (header-only, torch-free). ``base`` (a
    checkpoint path or a ``load_lora`` base function; only its shapes are read): lets a path with
    OFT/BOFT/GLoRA/DoRA modules be described, which is refused without it."""
    if isinstance(lora, (str, os.PathLike)):
        lora = _plan_of_file(lora, base)
        mods = list(lora.modules)
    else:
        mods = list(lora)
    ranks = [m.rank for m in mods]
    alphas = [a for a in map(_alpha_of, mods) if a is not None]
    scales = [_num(m.scale) for m in mods]
    dtypes = Counter(m.dtype if isinstance(m.dtype, str) else short_name(m.dtype)
                     for m in mods)
    kinds = Counter("conv3x3+" if m.kind == "conv" and m.kernel_size and tuple(m.kernel_size) != (1, 1)
                    else m.kind for m in mods)
    src = lora.source
    out: Dict[str, Any] = {
        "file": src,
        "format": lora.format,
        "base_model": lora.base_model,
        "modules": len(mods),
        "components": dict(Counter(m.key.split(".", 1)[0] for m in mods)),
        "kinds": {"linear": kinds.get("linear", 0), "conv1x1": kinds.get("conv", 0),
                  "conv": kinds.get("conv3x3+", 0)},
        "ranks": {"min": min(ranks) if ranks else None, "max": max(ranks) if ranks else None,
                  "histogram": _hist(ranks)},
        "alphas": _hist(alphas),
        "scales": _hist(scales),
        "dtype": dtypes.most_common(1)[0][0] if dtypes else None,
        "parameters": sum(m.rank * (m.out_features + m.in_features) for m in mods),
        "layout": {k: v for k, v in (lora.layout or {}).items()},
        "metadata": {k: lora.metadata[k] for k in _META_SHOWN if k in (lora.metadata or {})},
    }
    adapters = Counter(getattr(m, "adapter", None) for m in mods)
    if None not in adapters and set(adapters) != {"lora"}:
        out["adapters"] = dict(adapters)          # LyCORIS / DoRA / full diff modules (read exactly)
    if src and os.path.isfile(src):
        out["file_size"] = os.path.getsize(src)
    return out


def format_description(d: Dict[str, Any]) -> str:
    """Human-readable lines for one :func:`describe` result (the CLI may use it)."""
    r = d["ranks"]
    rank_s = str(r["min"]) if r["min"] == r["max"] else f"{r['min']}..{r['max']} {r['histogram']}"
    lines = [
        f"{d['file']}",
        f"  format      {d['format']}",
        f"  base model  {d['base_model'] or 'unknown'}",
        f"  modules     {d['modules']} " + " ".join(f"{k}={v}" for k, v in d["components"].items()),
        f"  kinds       " + " ".join(f"{k}={v}" for k, v in d["kinds"].items() if v),
        f"  ranks       {rank_s}",
    ] + ([f"  adapters    " + " ".join(f"{k}={v}" for k, v in d["adapters"].items())] if d.get("adapters") else []) + [
        f"  alphas      {d['alphas']}",
        f"  dtype       {d['dtype']}",
        f"  parameters  {d['parameters']:,}",
    ]
    from ..errors import escape_controls
    return "\n".join(escape_controls(l) for l in lines)
