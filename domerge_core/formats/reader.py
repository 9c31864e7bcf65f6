"""Build a lazy :class:`~domerge_core.lora.Lora` from a :class:`~.plan.FilePlan`: factor data is read
only when a module's ``loader`` is called (NaN/inf are refused then, naming the key)."""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Tuple

import math

import torch

from ..errors import LoraFormatError
from ..lora import Lora, LoraModule
from . import lycoris, lycoris_base
from .canonical import Rows, stack_rows, take_rows
from .dtypes import torch_dtype
from .keys import ModuleKeys
from .plan import ModulePlan, PeftScale, TensorSource, plan_modules, read_adapter_config  # noqa: F401

def _finite(t: torch.Tensor, src: TensorSource, key: str) -> torch.Tensor:
    # min/max propagate NaN and show ±inf, and are ~20x faster than isfinite().all() on fp16
    if t.numel() and not all(math.isfinite(float(x)) for x in torch.aminmax(t.reshape(-1))):
        bad = "NaN" if torch.isnan(t).any() else "infinite values"
        raise LoraFormatError(f"factor contains {bad}", file=src.label, key=key)
    return t


def _lycoris_loader(src: TensorSource, g: ModuleKeys, rows: Rows):
    roles = {r: k for r, k in g.keys.items() if r != "alpha"}

    def load():
        up, down = lycoris.factors(lambda role: _finite(src.get(roles[role]), src, roles[role]), g.family, roles)
        return take_rows(up, rows), down

    return load


def _loader(src: TensorSource, g: ModuleKeys, out_f: int, rows: Rows):
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
        return take_rows(up, rows), down

    return load


BaseFn = Callable[[str, str], Optional[torch.Tensor]]


def _base_weight(base: BaseFn, p: ModulePlan, src: TensorSource, key: str, kind: str) -> torch.Tensor:
    """The base weight a DoRA / OFT / BOFT / GLoRA module needs, or a clear error naming the file and key.
    A part of a fused module is asked for by its canonical key alone (the file's name is the whole
    fused module)."""
    w = base(p.key, p.group.name if p.rows is None else p.key)
    if w is None:
        raise LoraFormatError(f"{kind} module: its base weight was not found in the given base model",
                              file=src.label, key=key)
    return w


def _weight_shape(p: ModulePlan) -> Tuple[int, ...]:
    if p.kernel_size:
        return (p.out_features, p.in_features // math.prod(p.kernel_size), *p.kernel_size)
    return (p.out_features, p.in_features)


def _update_fn(src: TensorSource, p: ModulePlan):
    """``fn(W) -> (up, down)``: the module's own update before any alpha — what ComfyUI's adapters
    call ``lora_diff`` — given the base weight W (ignored by LoRA/LoHa/LoKr)."""
    g = p.group
    if g.family in lycoris_base.FAMILIES:
        roles = {r: k for r, k in g.keys.items() if r not in ("alpha", "dora_scale")}
        get = lambda role: _finite(src.get(roles[role]), src, roles[role])  # noqa: E731
        return lambda W: lycoris_base.update(get, g.family, roles, W, p.oft_alpha)
    plain = _loader(src, g, p.out_features, None)
    return lambda W: plain()


def _shaped_base(base: BaseFn, p: ModulePlan, src: TensorSource, key: str, kind: str) -> torch.Tensor:
    w = _base_weight(base, p, src, key, kind)
    shape = _weight_shape(p)
    if w.numel() != math.prod(shape) or w.shape[0] != shape[0]:
        raise LoraFormatError(f"{kind} module: base weight has shape {list(w.shape)}, the LoRA patches "
                              f"{list(shape)}", file=src.label, key=key)
    return w.reshape(shape)


def _fused_base(base: BaseFn, p: ModulePlan, parts: Optional[list], src: TensorSource, key: str,
                kind: str) -> torch.Tensor:
    """The base weight the file's module patches: its own, or for the parts of a fused module (kohya
    Flux ``img_attn_qkv``, SD3 ``attn.qkv``, ``final_layer.adaLN_modulation.1`` whose halves diffusers
    swaps) the parts' base weights — each asked for by its canonical key — put back at their rows."""
    if not parts:
        return _shaped_base(base, p, src, key, kind)
    ws = [(q.rows, _shaped_base(base, q, src, key, kind)) for q in parts]
    try:
        return stack_rows(ws, p.fused_rows, f"{kind} module {p.group.name!r}")
    except ValueError as e:
        raise LoraFormatError(str(e), file=src.label, key=key) from None


def _dora_loader(src: TensorSource, p: ModulePlan, base: BaseFn, parts: Optional[list] = None,
                 shared: Optional["_Shared"] = None):
    """DoRA as ComfyUI applies it (``weight_decompose``) on any adapter's update D(W) (LoRA, LoHa,
    LoKr, GLoRA, OFT, BOFT): with a = ``p.lora_scale`` (the alpha ComfyUI passes: the adapter's scale, or
    OFT/BOFT's constraint), W' = (W + a·D) · m / ‖W + a·D‖ (per input column; per output row with ‖W‖
    when ``dora_scale`` has one value per output), ΔW = W' − W — dense, from the base weight, written
    exactly as (ΔW, I) / (I, ΔW).

    A fused module (``parts``: the ModulePlans of its rows) is decomposed whole, as ComfyUI does on the
    fused weight: W is the parts' base rows stacked back (:func:`_fused_base`), and each part takes
    its rows of the one ΔW (computed once, ``shared``)."""
    update = _update_fn(src, p)
    dk = p.group.keys["dora_scale"]

    def whole():
        w = _fused_base(base, p, parts, src, dk, "DoRA")
        shape = tuple(w.shape)
        eps = torch.finfo(w.dtype).eps if w.dtype.is_floating_point else 0.0
        W = w.to(torch.float64)
        up, down = update(w)
        diff = ((up.to(torch.float64) @ down.to(torch.float64)) * p.lora_scale).reshape(shape)
        mag = _finite(src.get(dk), src, dk).to(torch.float64)
        calc = W + diff
        if mag.shape[0] == shape[0]:        # one magnitude per output row (ComfyUI normalises W itself)
            norm = W.reshape(shape[0], -1).norm(dim=1).reshape(shape[0], *[1] * (len(shape) - 1))
        else:                               # kohya / LyCORIS / PEFT: per input column of W + ΔW
            norm = calc.transpose(0, 1).reshape(shape[1], -1).norm(dim=1).reshape(
                shape[1], *[1] * (len(shape) - 1)).transpose(0, 1)
        if mag.numel() != norm.numel():
            raise LoraFormatError(f"dora_scale has shape {list(mag.shape)}, expected {list(norm.shape)}",
                                  file=src.label, key=dk)
        dW = calc * (mag.reshape(norm.shape) / (norm + eps)) - W
        return dW.reshape(shape[0], -1)

    def load():
        if parts:
            return lycoris._capped_dense(take_rows(shared.get(whole), p.rows))
        return lycoris._capped_dense(whole())

    return load


class _Shared:
    """The update of a fused module computed once (on the fused base weight) and kept until each of
    its ``n`` parts has taken its rows."""

    def __init__(self, n: int):
        self.n, self.left, self.value = n, 0, None

    def get(self, compute):
        value = self.value
        if value is None:
            value, self.left = compute(), self.n
        self.left -= 1
        self.value = value if self.left > 0 else None
        return value


def _base_loader(src: TensorSource, p: ModulePlan, base: BaseFn, parts: Optional[list] = None,
                 shared: Optional[_Shared] = None):
    """OFT / BOFT / GLoRA without DoRA: the update against the base weight (exact factors). A fused
    module's update is computed once on its parts' base rows stacked back; each part takes its rows of
    the up factor (down is shared), capped to exact factors of its own size."""
    update = _update_fn(src, p)
    kind = lycoris.NAMES[p.group.family]
    key = p.group.keys.get("oft_blocks") or p.group.keys["a1"]

    def load():
        if parts:
            up, down = shared.get(lambda: update(_fused_base(base, p, parts, src, key, kind)))
            return lycoris._capped(take_rows(up, p.rows), down)
        return update(_shaped_base(base, p, src, key, kind))

    return load


def build_lora(src: TensorSource, metadata: Optional[Mapping[str, str]] = None, *,
               adapter_config: Optional[Mapping[str, Any]] = None, base: Optional[BaseFn] = None) -> Lora:
    """``base(canonical key, module name in the file) -> weight tensor or None``: the base model's
    weights, needed by (and only read for) modules whose update depends on them: DoRA (kohya, LyCORIS,
    PEFT), LyCORIS OFT / BOFT / GLoRA, PEFT OFT / BOFT; without it those files are refused."""
    from .base_pipeline import shape_of
    plan = plan_modules(src, metadata, adapter_config=adapter_config, allow_dora=base is not None,
                        base_shape=shape_of(base))
    modules = {}
    fused: dict = {}          # the parts of a fused base-dependent module share one update of the fused weight
    for p in plan.modules.values():
        if p.rows is not None and p.peft is None and (p.lora_scale is not None or
                                                      p.group.family in lycoris_base.FAMILIES):
            fused.setdefault(p.group.name, []).append(p)
    shared = {name: _Shared(len(ps)) for name, ps in fused.items()}
    for key, p in plan.modules.items():
        parts = fused.get(p.group.name) if p.rows is not None else None
        if p.peft is not None:
            from .peft_adapters import make_loader
            loader = make_loader(src, p, base)
        elif p.lora_scale is not None:
            loader = _dora_loader(src, p, base, parts, shared.get(p.group.name))
        elif p.group.family in lycoris_base.FAMILIES:
            loader = _base_loader(src, p, base, parts, shared.get(p.group.name))
        else:
            loader = _loader(src, p.group, p.out_features, p.rows)
        modules[key] = LoraModule(key=key, kind=p.kind, out_features=p.out_features, in_features=p.in_features,
                                  rank=p.rank, scale=p.scale, loader=loader,
                                  kernel_size=p.kernel_size, source_name=p.group.name, dtype=torch_dtype(p.dtype))
    return Lora(modules=modules, format=plan.format, source=src.label, metadata=plan.metadata,
                dtype=torch_dtype(plan.dtype), base_model=plan.base_model, layout=plan.layout)
