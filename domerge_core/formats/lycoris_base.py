"""LyCORIS adapters whose update depends on the base weight W: OFT, BOFT, GLoRA (and DoRA on any
adapter, reader._dora_loader). They are read only against a base model (the merge node's MODEL/CLIP,
``domerge merge --base``, ``load_lora(..., base=fn)``), as what ComfyUI 0.3.75's weight adapters
(``comfy/weight_adapter/{oft,boft,glora}.py``) patch at strength 1; without a base they are refused.

OFT (3-D ``oft_blocks`` k×b×b): ``lycoris.oft_update``; dense, exact at rank min(m, n). ComfyUI loads
an OFT ``.rescale`` but does not apply it (0.3.75) — neither do we.

BOFT (4-D ``oft_blocks`` s×k×b×b, optional ``.rescale``, ``.alpha`` = norm constraint): s butterfly
stages, each R_i = (I+Q)(I−Q)⁻¹ on blocks of b rows taken in the stage's butterfly order (rows of a
group of 2·2ⁱ·(b/2) interleaved in pairs), then ``· rescale``; ΔW = B·W − W, dense, exact at rank
min(m, n). ComfyUI's strength is not linear for BOFT (each stage is ``s·R_i + (1−s)·I``, then
``s·ΔW(s)``); a merge weight w scales ΔW(1) linearly. ComfyUI fails on a BOFT without ``.alpha``
(``None > 0``) and patches nothing: such a module is refused.

GLoRA (``a1/a2/b1/b2.weight``, ``.alpha``): ComfyUI's layout test decides between
- GLoRA: ΔW = (alpha/r)·(W·a1·a2 + b1·b2) = (alpha/r)·[W·a1 | b1]·[a2 ; b2] — exactly rank 2r, no m×n
  matrix (r = a2 rows). Conv: ComfyUI's einsum applies a1·a2 to the input channels at every kernel
  position, i.e. ΔW_flat = W_flat·kron(a1, I)·kron(a2, I) + b1·b2_flat: rank r·kh·kw + r, still factors.
- old GLoRA (a1 rows = a2 cols = b1 rows = b2 cols = r; chosen too when both tests pass, a2 has as
  many rows as W and W is square): ΔW = (alpha/r)·(b2·b1 + W_flat·a2·a1) = [W_flat·a2 | b2]·[a1 ; b1].
Factors of inner size > min(m, n) are written as their exact dense product (``lycoris._capped``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple

from ..errors import LoraFormatError

FAMILIES = ("oft", "boft", "glora")
GLORA_ROLES = ("a1", "a2", "b1", "b2")
SUFFIXES = tuple((f".{r}.weight", r, "glora") for r in GLORA_ROLES)
NAMES = {"oft": "LyCORIS OFT", "boft": "LyCORIS BOFT", "glora": "LyCORIS GLoRA"}
# keys that classify as unsupported (keys._UNSUPPORTED) but are read when a base model is given
NEEDS_BASE = (".dora_scale", ".oft_blocks", ".a1.weight", ".b1.weight")


def refine_family(src, g) -> None:
    """``.oft_blocks`` is OFT when 3-D and BOFT when 4-D (ComfyUI tells them apart the same way)."""
    if g.family == "oft" and len(src.shapes[g.keys["oft_blocks"]]) == 4:
        g.family = "boft"


def _shape(src, g, role: str, dims: Sequence[int]) -> Tuple[int, ...]:
    k = g.keys[role]
    s = tuple(int(x) for x in src.shapes[k])
    if len(s) not in dims or any(x <= 0 for x in s):
        raise LoraFormatError(f"{NAMES[g.family]} tensor {role} of module {g.name!r} has shape {list(s)}",
                              file=src.label, key=k)
    return s


def _flat2(s: Tuple[int, ...]) -> Tuple[int, int]:
    """The shape of ``t.flatten(start_dim=1)`` (ComfyUI flattens every GLoRA factor so)."""
    return s[0], math.prod(s[1:])


def _glora_new_old(raw: Dict[str, Tuple[int, ...]]) -> Tuple[bool, bool]:
    """ComfyUI's two shape tests on the stored (unflattened) shapes."""
    a1, a2, b1, b2 = (raw[r] for r in GLORA_ROLES)
    old = b2[1] == b1[0] == a1[0] == a2[1]
    new = b2[0] == b1[1] == a1[1] == a2[0]
    return new, old


def glora_is_old(raw: Dict[str, Tuple[int, ...]], wshape: Tuple[int, ...]) -> Optional[bool]:
    """True: old GLoRA, False: GLoRA, None: neither shape test passes. When both pass, ComfyUI keeps
    the old layout only if a2 has as many rows as W and W is square (``shape[0] == shape[1]``)."""
    new, old = _glora_new_old(raw)
    if not (new or old):
        return None
    if new and old:
        return raw["a2"][0] == wshape[0] and wshape[0] == wshape[1]
    return old


def rows(src, g) -> int:
    """The output width from the file alone (for the name mapping; the base weight decides the rest)."""
    if g.family == "oft":
        bs = _shape(src, g, "oft_blocks", (3,))
        if bs[1] != bs[2]:
            raise LoraFormatError(f"LyCORIS OFT module {g.name!r}: oft_blocks of shape {list(bs)} are not "
                                  f"square blocks", file=src.label, key=g.keys["oft_blocks"])
        return bs[0] * bs[1]
    if g.family == "boft":
        bs = _shape(src, g, "oft_blocks", (4,))
        if bs[2] != bs[3] or bs[2] < 2:
            raise LoraFormatError(f"LyCORIS BOFT module {g.name!r}: oft_blocks of shape {list(bs)} are not "
                                  f"square blocks of size ≥ 2", file=src.label, key=g.keys["oft_blocks"])
        return bs[1] * bs[2]
    raw = {r: _shape(src, g, r, (2, 4)) for r in GLORA_ROLES}
    new, _ = _glora_new_old(raw)
    return raw["b1"][0] if new else raw["b2"][0]


@dataclass
class BaseGeometry:
    out_features: int
    in_features: int
    kernel: Optional[Tuple[int, ...]]
    rank: int                        # of the exact factors written
    divisor: Optional[int]           # GLoRA: ComfyUI's alpha / rank divisor
    constraint: Optional[float]      # OFT/BOFT: the norm constraint alpha (0: none)


def _constraint(src, g, scalar: Callable[[str], float]) -> float:
    if "alpha" not in g.keys:
        if g.family == "boft":
            raise LoraFormatError(f"LyCORIS BOFT module {g.name!r} has no .alpha: ComfyUI 0.3.75 fails on it "
                                  f"('None > 0') and leaves the weight unpatched", file=src.label,
                                  key=g.keys["oft_blocks"])
        return 0.0                   # ComfyUI's OFT: no alpha = 0 = no constraint
    ak = g.keys["alpha"]
    v = float(scalar(ak))
    if not math.isfinite(v):
        raise LoraFormatError(f"alpha is {v} (not finite)", file=src.label, key=ak)
    return v


def _broadcasts_to(s: Tuple[int, ...], target: Tuple[int, ...]) -> bool:
    if len(s) > len(target):
        return False
    return all(a in (1, b) for a, b in zip(reversed(s), reversed(target)))


def geometry(src, g, shape: Tuple[int, ...], scalar: Callable[[str], float]) -> BaseGeometry:
    """Check the module against its base weight's ``shape``; raise naming file and key otherwise."""
    label, what = src.label, NAMES[g.family]
    m, n = shape[0], math.prod(shape[1:])
    kernel = tuple(shape[2:]) if len(shape) == 4 else None

    def bad(msg, role):
        return LoraFormatError(f"{what} module {g.name!r}: {msg}", file=label, key=g.keys[role])

    if g.family in ("oft", "boft"):
        bs = _shape(src, g, "oft_blocks", (3, 4))
        if bs[-3] * bs[-1] != m:
            raise bad(f"oft_blocks {list(bs)} cover {bs[-3] * bs[-1]} rows, the base weight has shape "
                      f"{list(shape)}", "oft_blocks")
        if g.family == "boft":
            half = bs[2] // 2
            for i in range(bs[0]):
                if m % (2 * 2 ** i * half):
                    raise bad(f"butterfly stage {i} of oft_blocks {list(bs)} needs the row count to be a "
                              f"multiple of {2 * 2 ** i * half}; the base weight has shape {list(shape)}",
                              "oft_blocks")
            if "rescale" in g.keys and not _broadcasts_to(tuple(src.shapes[g.keys["rescale"]]), tuple(shape)):
                raise bad(f"rescale of shape {list(src.shapes[g.keys['rescale']])} does not broadcast to the "
                          f"base weight's {list(shape)}", "rescale")
        return BaseGeometry(m, n, kernel, min(m, n), None, _constraint(src, g, scalar))
    raw = {r: _shape(src, g, r, (2, 4)) for r in GLORA_ROLES}
    old = glora_is_old(raw, shape)
    if old is None:
        raise bad("factor shapes " + ", ".join(f"{r} {list(raw[r])}" for r in GLORA_ROLES)
                  + " fit neither GLoRA layout", "a1")
    a1, a2, b1, b2 = (_flat2(raw[r]) for r in GLORA_ROLES)
    kk = n // shape[1]
    if old:
        ok = a2 == (n, a1[0]) and a1[1] == n and b2 == (m, b1[0]) and b1[1] == n
        inner, divisor = a1[0] + b1[0], raw["a1"][0]
    else:
        ok = a1 == (shape[1], a2[0]) and a2[1] == shape[1] and b1 == (m, b2[0]) and b2[1] == n
        inner, divisor = a1[1] * kk + b1[1], raw["a2"][0]
    if not ok:
        raise bad(f"{'old ' if old else ''}GLoRA factors " + ", ".join(f"{r} {list(raw[r])}" for r in GLORA_ROLES)
                  + f" do not fit the base weight of shape {list(shape)}", "a1")
    return BaseGeometry(m, n, kernel, min(inner, m, n), divisor, None)


# ----------------------------------------------------------------------------------------------
# updates (torch from here on), float64
# ----------------------------------------------------------------------------------------------
def glora_factors(t: Dict[str, "object"], W):
    """Exact (up, down) of ComfyUI's GLoRA ``lora_diff`` (alpha not applied), for base weight W."""
    import torch
    from . import lycoris
    f64 = torch.float64
    a1, a2, b1, b2 = (t[r].to(f64).flatten(start_dim=1) for r in GLORA_ROLES)
    W = W.to(f64)
    old = glora_is_old({r: tuple(t[r].shape) for r in GLORA_ROLES}, tuple(W.shape))
    o = W.shape[0]
    if old:                                                      # b2·b1 + W·a2·a1
        up, down = torch.cat([W.reshape(o, -1) @ a2, b2], 1), torch.cat([a1, b1], 0)
    elif W.dim() > 2:                                            # W_flat·kron(a1, I)·kron(a2, I) + b1·b2
        kk = math.prod(W.shape[2:])
        wa = torch.einsum("olp,lj->ojp", W.reshape(o, W.shape[1], kk), a1).reshape(o, -1)
        up = torch.cat([wa, b1], 1)
        down = torch.cat([torch.kron(a2, torch.eye(kk, dtype=f64)), b2], 0)
    else:                                                        # W·a1·a2 + b1·b2
        up, down = torch.cat([W @ a1, b1], 1), torch.cat([a2, b2], 0)
    return lycoris._capped(up, down)


def _cayley(blocks, alpha: float):
    """R = (I + Q)(I − Q)⁻¹, Q = B − Bᵀ scaled to ‖Q‖ = alpha when alpha > 0 and ‖Q‖ is larger
    (the norm over all blocks and stages, as ComfyUI)."""
    import torch
    q = blocks.to(torch.float64)
    q = q - q.transpose(-1, -2)
    if alpha > 0:
        qn = torch.linalg.norm(q) + 1e-8
        if qn > alpha:
            q = q * alpha / qn
    eye = torch.eye(q.shape[-1], dtype=torch.float64)
    return (eye + q) @ torch.linalg.inv(eye - q)


def boft_update(blocks, rescale, W, alpha: float):
    """ComfyUI's BOFT at strength 1: ΔW (m × n, flattened) = rescale · B·W − W."""
    import torch
    stages, k, b, _ = blocks.shape
    r = _cayley(blocks, alpha)
    org = W.to(torch.float64)
    m = org.shape[0]
    x = org.reshape(m, -1)
    for i in range(stages):
        step = 2 ** i * (b // 2)
        perm = torch.arange(m).reshape(-1, 2, step).transpose(1, 2).reshape(-1)   # the stage's row order
        y = torch.einsum("kij,kjn->kin", r[i], x[perm].reshape(k, b, -1)).reshape(m, -1)
        x = torch.empty_like(y)
        x[perm] = y
    x = x.reshape(org.shape)
    if rescale is not None:
        x = x * rescale.to(torch.float64)
    return (x - org).reshape(m, -1)


def update(get: Callable[[str], "object"], family: str, roles: Dict[str, str], W, constraint: Optional[float]):
    """(up, down) of the module's unscaled update against base weight W, exact, float64."""
    from . import lycoris
    if family == "glora":
        return glora_factors({r: get(r) for r in GLORA_ROLES}, W)
    if family == "boft":
        rescale = get("rescale") if "rescale" in roles else None
        return lycoris._capped_dense(boft_update(get("oft_blocks"), rescale, W, constraint or 0.0))
    # OFT: ComfyUI loads a .rescale but does not apply it (0.3.75); neither do we
    return lycoris._capped_dense(lycoris.oft_update(get("oft_blocks"), W, constraint))
