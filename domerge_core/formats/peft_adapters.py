"""PEFT adapters whose update depends on the base weight, read as dense ΔW = W' − W (exact, written
as ``(ΔW, I)`` / ``(I, ΔW)`` of rank min(m, n)), W' being what PEFT's own ``merge()`` (peft 0.21)
writes into the layer:

- **DoRA** (LoRA with ``use_dora``; tensor ``<module>.lora_magnitude_vector``, PEFT 0.9-0.21 also
  ``….lora_magnitude_vector.weight``): ``V = W + s·BA`` (s = lora_alpha/r, rsLoRA, patterns: the
  LoRA's own scale), ``W' = m · V / ‖V‖`` with ``‖V‖`` the L2 norm of each OUTPUT row (Linear:
  ``norm(dim=1)``; Conv: over ``(in, kh, kw)``), no epsilon. Unlike kohya ``dora_scale`` (read the
  ComfyUI way in ``reader._dora_loader``).
- **OFT** (``OFTConfig``, PEFT ≥ 0.14: ``<module>.oft_R.weight`` of shape (blocks, b(b−1)/2), the upper
  triangle of a skew block Q): ``R_k`` = Cayley–Neumann series ``I + 2Q + 2Q² + … + Q^t`` (PEFT's
  ``_cayley_batch``, ``num_cayley_neumann_terms``) or exact Cayley ``(I − Q)(I + Q)⁻¹``;
  ``coft`` projects each Q to Frobenius norm ≤ eps/√blocks first; ``block_share``: one block for all.
  ``W' = W · blockdiag(R)ᵀ`` (rotation of the input side; conv over the flattened (in·kh·kw)).
- **BOFT** (``BOFTConfig``: ``<module>.boft_R`` (N, D, b, b), ``<module>.boft_s`` (out, 1) / (1, out)):
  ``R = (I − S)(I + S)⁻¹`` with ``S = (B − Bᵀ)/2``, ``W' = (W · blockdiag(R)ᵀ) · diag(s)`` on rows.
  Only N = 1 (one butterfly factor; what PEFT trains and loads without its CUDA extension) is read;
  N > 1 is refused by name.

Refused by name: OFT from PEFT < 0.14 (``oft_r``/``oft_s``, which PEFT itself no longer loads), OFT/BOFT
without their ``adapter_config.json`` (the Cayley settings live there), ``fan_in_fan_out`` layers,
non-square conv kernels (PEFT's own merge assumes kh = kw). Every such module needs the base weight:
``base(canonical key, module name) -> tensor or None`` as for kohya DoRA.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Tuple

from ..errors import LoraFormatError, UnsupportedFormatError

# (suffix, role, family) for keys.SUFFIXES; "magnitude" attaches to a lora_A/lora_B module
SUFFIXES: Tuple[Tuple[str, str, str], ...] = (
    (".lora_magnitude_vector.default.weight", "magnitude", ""),
    (".lora_magnitude_vector.weight", "magnitude", ""),
    (".lora_magnitude_vector.default", "magnitude", ""),
    (".lora_magnitude_vector", "magnitude", ""),
    (".oft_R.default.weight", "oft_R", "peft_oft"),
    (".oft_R.weight", "oft_R", "peft_oft"),
    (".boft_R.default", "boft_R", "peft_boft"),
    (".boft_R", "boft_R", "peft_boft"),
    (".boft_s.default", "boft_s", "peft_boft"),
    (".boft_s", "boft_s", "peft_boft"),
)
FAMILIES = ("peft_oft", "peft_boft")
NAMES = {"peft_oft": "PEFT OFT", "peft_boft": "PEFT BOFT", "magnitude": "PEFT DoRA"}
ROLES = {"peft_oft": ("oft_R",), "peft_boft": ("boft_R", "boft_s")}
BASE_HINT = ("its update depends on the base model's weights: give a base (CLI --base MODEL.safetensors, "
             "the node's MODEL/CLIP inputs, MergePanel(base=pipe) or load_lora(..., base=...))")


def readable_with_base(key: str) -> bool:
    """Whether ``key`` is a PEFT DoRA/OFT/BOFT tensor read here (given a base)."""
    return any(key.endswith(s) for s, _, _ in SUFFIXES)


def check_roles(name: str, family: str, roles: Mapping[str, str], file: Optional[str]) -> None:
    any_key = next(iter(roles.values()))
    for role in ROLES[family]:
        if role not in roles:
            raise LoraFormatError(f"{NAMES[family]} module {name!r} has no {role} tensor (expected "
                                  f"{name}.{role})", file=file, key=any_key)
    extra = [r for r in roles if r not in ROLES[family]]
    if extra:
        raise LoraFormatError(f"{NAMES[family]} module {name!r} also has a {extra[0]} tensor",
                              file=file, key=roles[extra[0]])


# ----------------------------------------------------------------------------------------------
# configs
# ----------------------------------------------------------------------------------------------
def rotation_type(cfg: Optional[Mapping[str, Any]]) -> Optional[str]:
    """"OFT" / "BOFT" for a PEFT OFT/BOFT adapter config, else None."""
    if not cfg:
        return None
    t = cfg.get("peft_type")
    if isinstance(t, str) and t.upper() in ("OFT", "BOFT"):
        return t.upper()
    return None


def _bool(cfg, name, default, label):
    v = cfg.get(name, default)
    if v is None:
        v = default
    if not isinstance(v, bool):
        raise LoraFormatError(f"adapter config: {name} must be true or false, not {v!r}", file=label, key=name)
    return v


def _version(text) -> Tuple[int, ...]:
    out = []
    for part in str(text).partition("@")[0].split(".")[:3]:
        digits = "".join(c for c in part if c.isdigit()) if part else ""
        if not digits:
            break
        out.append(int(digits))
    return tuple(out)


@dataclass
class RotationConfig:
    kind: str                       # "OFT" | "BOFT"
    label: str
    coft: bool = False
    eps: float = 6e-5
    block_share: bool = False
    cayley_neumann: bool = True
    neumann_terms: int = 5

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], label: str) -> "RotationConfig":
        kind = rotation_type(cfg)
        if _bool(cfg, "fan_in_fan_out", False, label):
            raise UnsupportedFormatError(f"format found: PEFT {kind} with fan_in_fan_out (Conv1D layers) is not "
                                         f"read", file=label, key="fan_in_fan_out")
        if kind == "BOFT":
            return cls(kind, label)
        if "oft_block_size" not in cfg:
            raise UnsupportedFormatError("format found: PEFT OFT from PEFT < 0.14 (no oft_block_size in its "
                                         "config); PEFT itself no longer loads these", file=label,
                                         key="oft_block_size")
        eps = cfg.get("eps", 6e-5)
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
            raise LoraFormatError(f"adapter config: eps must be a non-negative number, not {eps!r}", file=label,
                                  key="eps")
        terms = cfg.get("num_cayley_neumann_terms", 5)
        if isinstance(terms, bool) or not isinstance(terms, int) or not 0 < terms <= 1000:
            raise LoraFormatError(f"adapter config: num_cayley_neumann_terms must be a positive integer, not "
                                  f"{terms!r}", file=label, key="num_cayley_neumann_terms")
        neumann = _bool(cfg, "use_cayley_neumann", False, label)
        if neumann and _version(cfg.get("peft_version", "0")) < (0, 18):
            # PEFT 0.18 changed the series; it only warns. Which series trained the file is unknown.
            raise UnsupportedFormatError("format found: PEFT OFT with use_cayley_neumann from PEFT < 0.18 "
                                         "(the series changed in 0.18; the file's own is ambiguous)",
                                         file=label, key="peft_version")
        return cls(kind, label, coft=_bool(cfg, "coft", False, label), eps=float(eps),
                   block_share=_bool(cfg, "block_share", False, label), cayley_neumann=neumann,
                   neumann_terms=terms)


@dataclass
class PeftSpec:
    """What ``reader.build_lora`` needs to make a PEFT DoRA/OFT/BOFT module's loader."""
    kind: str                                   # "dora" | "oft" | "boft"
    lora_scale: float = 1.0                     # DoRA: s of V = W + s·BA
    rotation: Optional[RotationConfig] = None   # OFT / BOFT
    base_shape: Optional[Tuple[int, ...]] = None


# ----------------------------------------------------------------------------------------------
# geometry (shapes only)
# ----------------------------------------------------------------------------------------------
def block_size_of(n_elements: int) -> Optional[int]:
    """b with b(b−1)/2 = n_elements, or None."""
    b = (1 + math.isqrt(1 + 8 * n_elements)) // 2
    return b if b * (b - 1) // 2 == n_elements and b >= 2 else None


def rotation_geometry(src, g, base_shape, rot: Optional[RotationConfig]):
    """(out, in, rank, kernel) of an OFT/BOFT module from the base weight's shape; raises on any
    inconsistency (naming the file and key)."""
    fam = g.family
    what = NAMES[fam]
    key = g.keys["oft_R" if fam == "peft_oft" else "boft_R"]
    if rot is None or rot.kind != ("OFT" if fam == "peft_oft" else "BOFT"):
        raise UnsupportedFormatError(f"format found: {what}; it is read with its adapter_config.json "
                                     f"(peft_type {'OFT' if fam == 'peft_oft' else 'BOFT'}), which was not "
                                     f"found or is of another type", file=src.label, key=key)
    shape = tuple(int(x) for x in base_shape)
    if len(shape) not in (2, 4):
        raise UnsupportedFormatError(f"{what} on a weight of shape {list(shape)} is not read", file=src.label,
                                     key=key)
    if len(shape) == 4 and shape[2] != shape[3]:
        raise UnsupportedFormatError(f"{what} on a {shape[2]}x{shape[3]} conv kernel is not read (PEFT's merge "
                                     f"assumes square kernels)", file=src.label, key=key)
    out_f, in_f = shape[0], int(math.prod(shape[1:]))
    t = tuple(src.shapes[key])
    if fam == "peft_oft":
        if len(t) != 2:
            raise LoraFormatError(f"oft_R has shape {list(t)}, expected (blocks, b(b-1)/2)", file=src.label, key=key)
        b = block_size_of(t[1])
        if b is None or in_f % b:
            raise LoraFormatError(f"oft_R has shape {list(t)}: not a block size of the base weight's {in_f} "
                                  f"input columns", file=src.label, key=key)
        nb = in_f // b
        if t[0] != (1 if rot.block_share else nb):
            raise LoraFormatError(f"oft_R has shape {list(t)}, expected {[1 if rot.block_share else nb, t[1]]} "
                                  f"for {in_f} input columns (block_share={rot.block_share})", file=src.label, key=key)
    else:
        if len(t) != 4 or t[2] != t[3]:
            raise LoraFormatError(f"boft_R has shape {list(t)}, expected (N, blocks, b, b)", file=src.label, key=key)
        if t[0] != 1:
            raise UnsupportedFormatError(f"format found: PEFT BOFT with {t[0]} butterfly factors "
                                         f"(boft_n_butterfly_factor > 1) is not read; only one factor is",
                                         file=src.label, key=key)
        if t[1] * t[2] != in_f:
            raise LoraFormatError(f"boft_R has shape {list(t)}: {t[1]} blocks of {t[2]} do not cover the base "
                                  f"weight's {in_f} input columns", file=src.label, key=key)
        sk = g.keys["boft_s"]
        s = tuple(src.shapes[sk])
        if math.prod(s) != out_f or len(s) != 2 or 1 not in s:
            raise LoraFormatError(f"boft_s has shape {list(s)}, expected ({out_f}, 1) or (1, {out_f})",
                                  file=src.label, key=sk)
    kernel = shape[2:] if len(shape) == 4 else None
    return out_f, in_f, min(out_f, in_f), kernel


# ----------------------------------------------------------------------------------------------
# the updates (float64)
# ----------------------------------------------------------------------------------------------
def dora_update(W, up, down, scale: float, magnitude):
    """PEFT DoRA merged minus base: ``m · V / ‖V‖_row − W``, V = W + scale·up@down (flattened rows)."""
    import torch
    W = W.to(torch.float64).reshape(W.shape[0], -1)
    V = W + scale * (up.to(torch.float64) @ down.to(torch.float64))
    norm = torch.linalg.norm(V, dim=1)
    return V * (magnitude.to(torch.float64).reshape(-1) / norm)[:, None] - W


def _skew(vec, b: int):
    import torch
    rows, cols = torch.triu_indices(b, b, 1)
    q = torch.zeros(vec.shape[0], b, b, dtype=vec.dtype)
    q[:, rows, cols] = vec
    return q - q.transpose(1, 2)


def oft_rotations(vec, rot: RotationConfig):
    """PEFT ``OFTRotationModule.get_weight`` blocks (before ``block_diag``): (blocks stored, b, b)."""
    import torch
    vec = vec.to(torch.float64)
    b = block_size_of(vec.shape[1])
    q = _skew(vec, b)
    if rot.coft:        # _project_batch: Q scaled to Frobenius norm eps/√(stored blocks) where larger
        # as PEFT writes it: eps * 1 / torch.sqrt(torch.tensor(blocks)) -- a float32 value
        eps = float(rot.eps * 1 / torch.sqrt(torch.tensor(vec.shape[0])))
        n = torch.linalg.norm(q, dim=(1, 2), keepdim=True)
        q = torch.where(n <= eps, q, eps * q / n)
    eye = torch.eye(b, dtype=torch.float64).expand_as(q)
    if not rot.cayley_neumann:
        return torch.linalg.solve(eye + q, eye - q, left=False)
    t = rot.neumann_terms        # PEFT's _cayley_batch, term for term
    r = eye.clone()
    if t > 1:
        r = r + 2.0 * q
        if t > 2:
            q2 = q @ q
            r = r + 2.0 * q2
            p = q2
            for _ in range(3, t - 1):
                p = p @ q
                r = r + 2.0 * p
            p = p @ q
            r = r + p
    return r


def boft_rotations(R):
    """PEFT ``BOFTLayer.cayley_batch`` of the one butterfly factor: (blocks, b, b)."""
    import torch
    R = R.to(torch.float64).reshape(-1, R.shape[-2], R.shape[-1])
    s = 0.5 * (R - R.transpose(1, 2))
    eye = torch.eye(R.shape[-1], dtype=torch.float64).expand_as(s)
    return torch.linalg.solve(eye + s, eye - s, left=False)


def rotate_update(W, blocks, row_scale=None):
    """``W · blockdiag(blocks)ᵀ`` (blocks repeated when fewer than the columns need), rows times
    ``row_scale``, minus W — block by block, no in×in matrix."""
    import torch
    W = W.to(torch.float64).reshape(W.shape[0], -1)
    m, n = W.shape
    b = blocks.shape[-1]
    k = n // b
    if blocks.shape[0] != k:
        blocks = blocks.expand(k, b, b)
    Wb = W.reshape(m, k, b)
    out = torch.einsum("mkj,kij->mki", Wb, blocks).reshape(m, n)
    if row_scale is not None:
        out = out * row_scale.to(torch.float64).reshape(-1, 1)
    return out - W


# ----------------------------------------------------------------------------------------------
# loaders
# ----------------------------------------------------------------------------------------------
def make_loader(src, p, base):
    """The loader of a planned PEFT DoRA/OFT/BOFT module: dense ΔW as exact capped factors."""
    import torch

    from . import lycoris
    from .reader import _finite, _loader, _shaped_base

    spec: PeftSpec = p.peft
    g = p.group
    kind = {"dora": "PEFT DoRA", "oft": "PEFT OFT", "boft": "PEFT BOFT"}[spec.kind]
    first = g.keys["magnitude"] if spec.kind == "dora" else g.keys["oft_R" if spec.kind == "oft" else "boft_R"]
    plain = _loader(src, g, p.out_features, None) if spec.kind == "dora" else None

    def get(key):
        return _finite(src.get(key), src, key)

    def load():
        w = _shaped_base(base, p, src, first, kind)
        if spec.kind == "dora":
            mag = get(first)
            if mag.numel() != p.out_features:
                raise LoraFormatError(f"lora_magnitude_vector has shape {list(mag.shape)}, expected one value per "
                                      f"output ({p.out_features})", file=src.label, key=first)
            up, down = plain()
            dW = dora_update(w, up, down, spec.lora_scale, mag)
        elif spec.kind == "oft":
            dW = rotate_update(w, oft_rotations(get(first), spec.rotation))
        else:
            dW = rotate_update(w, boft_rotations(get(first)), get(g.keys["boft_s"]))
        if not bool(torch.isfinite(dW).all()):
            raise LoraFormatError(f"{kind} module: the update is not finite (singular rotation or zero norm)",
                                  file=src.label, key=first)
        return lycoris._capped_dense(dW)

    return load
