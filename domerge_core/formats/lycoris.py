"""LyCORIS LoHa and LoKr read as exact low-rank LoRA modules (``ΔW = scale · up @ down``).

LoHa (``hada_w1_a/b``, ``hada_w2_a/b``, optional Tucker ``hada_t1/t2``)::

    ΔW = (U₁D₁) ⊙ (U₂D₂) = U D,   U = U₁ • U₂  (face-splitting: row-wise Kronecker, m × r₁r₂)
                                   D = D₁ ∗ D₂  (Khatri–Rao: column-wise Kronecker, r₁r₂ × n)

since ``(U₁D₁)[i,j]·(U₂D₂)[i,j] = Σ_ab U₁[i,a]U₂[i,b]·D₁[a,j]D₂[b,j]``. A Tucker core is folded into
its ``D`` first (``D₁ = t₁ ×₂ w1_b``, ``U₁ = w1_aᵀ``), as ComfyUI's einsum ``ijkl,jr,ip->prkl`` does.
Scale: ``alpha / r₁`` (ComfyUI: ``alpha / hada_w1_b.shape[0]``; no alpha: 1).

LoKr (``lokr_w1`` or ``lokr_w1_a/b``; ``lokr_w2`` or ``lokr_w2_a/b``, optional Tucker ``lokr_t2``)::

    ΔW = kron(W₁, W₂) = kron(U₁, U₂) · kron(D₁, D₂)          (mixed-product property)

with each ``Wᵢ = UᵢDᵢ`` its stored factors, or, when stored whole (a×b), ``I_a · Wᵢ`` or ``Wᵢ · I_b``
(whichever has the smaller inner size): rank ≤ rank₁·rank₂, exact, and no m×n matrix is built (for
conv the kernel lives in W₂, and the column order of ``kron(D₁, D₂)`` is that of the flattened
``(out, in, kh, kw)`` weight, as in ComfyUI's ``kron(w1[..., None, None], w2)``). Scale: ``alpha /
r`` with r the inner size of the factored W₂, else of the factored W₁, else 1 (ComfyUI's rule: alpha is
ignored when both are stored whole).

A full ``.diff`` (LyCORIS "full", ComfyUI ``weight += strength · diff``) is read exactly as ``(ΔW, I)`` /
``(I, ΔW)`` of rank min(m, n) (merging truncates it with ``--rank``/``--energy`` like any input).

Only when LoHa's rank r₁r₂ exceeds min(m, n) is its dense update built (one module at a time, at
load) and written exactly as ``(ΔW, I)`` / ``(I, ΔW)`` of rank min(m, n) — no larger than the factors.

Non-Tucker conv factors are stored flattened (``in·kh·kw``) so the file does not say the kernel;
:func:`conv_kernel_hint` takes it from the module's canonical name (UNet ``conv1/conv2/conv_in/
conv_out/…samplers.N.conv`` are 3×3).
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

from ..errors import LoraFormatError
from . import lycoris_base

LOHA_ROLES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR_ROLES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
# (suffix, role, family) entries for keys.SUFFIXES
SUFFIXES = (tuple(("." + r, r, "loha") for r in LOHA_ROLES) + tuple(("." + r, r, "lokr") for r in LOKR_ROLES)
            + ((".diff", "diff", "diff"),) + lycoris_base.SUFFIXES)
# OFT / BOFT / GLoRA depend on the base weight: formats/lycoris_base.py
FAMILIES = ("loha", "lokr", "diff") + lycoris_base.FAMILIES
NAMES = {"loha": "LyCORIS LoHa", "lokr": "LyCORIS LoKr", "diff": "full weight difference (.diff)",
         **lycoris_base.NAMES}

_CONV3_TAILS = (".conv1", ".conv2", ".conv_in", ".conv_out", ".conv")


def check_roles(name: str, family: str, roles: Dict[str, str], file: Optional[str]) -> None:
    """Complete sets of factors only: a clear error naming the missing tensor otherwise."""
    what = NAMES[family]
    any_key = next(iter(roles.values()))

    def need(role: str):
        if role not in roles:
            raise LoraFormatError(f"{what} module {name!r} has no {role} tensor (expected {name}.{role})",
                                  file=file, key=any_key)

    if family in ("diff", "oft", "boft"):
        return
    if family == "glora":
        for r in lycoris_base.GLORA_ROLES:
            need(r)
        return
    if family == "loha":
        for r in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"):
            need(r)
        if ("hada_t1" in roles) != ("hada_t2" in roles):
            need("hada_t1")
            need("hada_t2")
        return
    for i in ("1", "2"):
        whole, a, b = f"lokr_w{i}", f"lokr_w{i}_a", f"lokr_w{i}_b"
        if whole in roles:
            if a in roles or b in roles:
                raise LoraFormatError(f"{what} module {name!r} stores {whole} both whole and factored",
                                      file=file, key=roles[whole])
        elif a in roles or b in roles:
            need(a)
            need(b)
        else:
            need(whole)
    if "lokr_t2" in roles and "lokr_w2_a" not in roles:
        raise LoraFormatError(f"{what} module {name!r} has lokr_t2 without lokr_w2_a/lokr_w2_b",
                              file=file, key=roles["lokr_t2"])


def conv_kernel_hint(canonical_key: str, in_features: int) -> Optional[Tuple[int, int]]:
    """The kernel of a flattened conv factor, from the module's canonical key (None: linear)."""
    if canonical_key.startswith("unet.") and canonical_key.endswith(_CONV3_TAILS) and in_features % 9 == 0:
        return (3, 3)
    return None


class _Shapes:
    def __init__(self, src, name: str, family: str, roles: Dict[str, str]):
        self.src, self.name, self.roles, self.what = src, name, roles, NAMES[family]

    def __call__(self, role: str, dims=(2,)) -> Tuple[int, ...]:
        k = self.roles[role]
        s = tuple(int(x) for x in self.src.shapes[k])
        if len(s) not in dims or any(x <= 0 for x in s):
            raise LoraFormatError(f"{self.what} tensor {role} of module {self.name!r} has shape {list(s)}",
                                  file=self.src.label, key=k)
        return s

    def bad(self, msg: str, role: str):
        return LoraFormatError(f"{self.what} module {self.name!r}: {msg}", file=self.src.label, key=self.roles[role])


def _flat(s: Tuple[int, ...]) -> int:
    n = 1
    for x in s[1:]:
        n *= x
    return n


def _whole_rank(a: int, b: int) -> int:
    return min(a, b)


def geometry(src, name: str, family: str, roles: Dict[str, str]):
    """(out, in, rank, kernel or None, alpha divisor or None) from shapes only."""
    sh = _Shapes(src, name, family, roles)
    if family == "diff":          # a full ΔW (ComfyUI: weight += strength · diff): exact at rank min(m, n)
        k = roles["diff"]
        s = tuple(int(x) for x in src.shapes[k])
        if len(s) not in (2, 4) or any(x <= 0 for x in s):
            raise LoraFormatError(f"a .diff of shape {list(s)} (a norm or bias difference) cannot be merged as a "
                                  f"LoRA; only 2-D (linear) and 4-D (conv) weight differences can",
                                  file=src.label, key=k)
        m, n = s[0], _flat(s)
        return m, n, min(m, n), (s[2:] if len(s) == 4 else None), None
    if family == "loha":
        kernel = None
        ranks, outs, ins = [], [], []
        for i in ("1", "2"):
            a, b, t = f"hada_w{i}_a", f"hada_w{i}_b", f"hada_t{i}"
            if t in roles:
                ts, as_, bs = sh(t, (4,)), sh(a), sh(b, (2, 4))
                if ts[0] != ts[1] or as_[0] != ts[0] or bs[0] != ts[1]:
                    raise sh.bad(f"Tucker shapes {t} {list(ts)} / {a} {list(as_)} / {b} {list(bs)} disagree", t)
                if len(bs) == 4 and bs[2:] != (1, 1):
                    raise sh.bad(f"{b} has shape {list(bs)}", b)
                kernel = kernel or ts[2:]
                ranks.append(ts[0]); outs.append(as_[1]); ins.append(bs[1] * ts[2] * ts[3])
            else:
                as_, bs = sh(a, (2, 4)), sh(b, (2, 4))
                if len(as_) == 4 and as_[2:] != (1, 1):
                    raise sh.bad(f"{a} has shape {list(as_)}", a)
                if len(bs) == 4:
                    kernel = kernel or bs[2:]
                if as_[1] != bs[0]:
                    raise sh.bad(f"shape mismatch: {a} {list(as_)} has rank {as_[1]} but {b} {list(bs)} "
                                 f"has rank {bs[0]}", a)
                ranks.append(bs[0]); outs.append(as_[0]); ins.append(_flat(bs))
        if outs[0] != outs[1] or ins[0] != ins[1]:
            raise sh.bad(f"the two Hadamard factors disagree ({outs[0]}x{ins[0]} vs {outs[1]}x{ins[1]})",
                         "hada_w2_a")
        if kernel is not None and ins[0] % (kernel[0] * kernel[1]):
            raise sh.bad(f"input width {ins[0]} is not a multiple of the {kernel[0]}x{kernel[1]} kernel",
                         "hada_w1_b")
        m, n = outs[0], ins[0]
        return m, n, min(ranks[0] * ranks[1], m, n), kernel, ranks[0]
    # LoKr
    kernel = None
    dims, krank = [], []
    divisor = None
    for i in ("1", "2"):
        whole, a, b, t = f"lokr_w{i}", f"lokr_w{i}_a", f"lokr_w{i}_b", f"lokr_t{i}"
        if whole in roles:
            ws = sh(whole, (2, 4) if i == "2" else (2,))
            if len(ws) == 4:
                kernel = ws[2:]
            o, n = ws[0], _flat(ws)
            r = _whole_rank(o, n)
        else:
            if t in roles:
                ts, as_, bs = sh(t, (4,)), sh(a), sh(b, (2, 4))
                if ts[0] != ts[1] or as_[0] != ts[0] or bs[0] != ts[1]:
                    raise sh.bad(f"Tucker shapes {t} {list(ts)} / {a} {list(as_)} / {b} {list(bs)} disagree", t)
                kernel = ts[2:]
                o, n, inner = as_[1], bs[1] * ts[2] * ts[3], ts[0]
            else:
                as_, bs = sh(a), sh(b, (2, 4) if i == "2" else (2,))
                if as_[1] != bs[0]:
                    raise sh.bad(f"shape mismatch: {a} {list(as_)} has rank {as_[1]} but {b} {list(bs)} "
                                 f"has rank {bs[0]}", a)
                if len(bs) == 4:
                    kernel = bs[2:]
                o, n, inner = as_[0], _flat(bs), bs[0]
            divisor = inner                      # w2's inner size overrides w1's (ComfyUI)
            r = min(inner, _whole_rank(o, n))
        dims.append((o, n))
        krank.append(r)
    (a1, b1), (c2, d2) = dims
    m, n = a1 * c2, b1 * d2
    if kernel is not None and n % (kernel[0] * kernel[1]):
        raise sh.bad(f"input width {n} is not a multiple of the kernel", "lokr_w2" if "lokr_w2" in roles
                     else "lokr_w2_b")
    return m, n, krank[0] * krank[1], kernel, divisor


# ----------------------------------------------------------------------------------------------
# factors (torch from here on)
# ----------------------------------------------------------------------------------------------
def _work_dtype(*ts):
    """float64: a product of two stored (≤ fp32) numbers is exact in it, so the factors are exact
    whatever dtype the caller asks for next (they are m×rank: small)."""
    import torch
    return torch.float64


def _tucker(t, w_a, w_b, dt):
    """(U m×r, D r×n) of ``einsum('ijkl,jr,ip->prkl', t, w_b, w_a)`` without building it."""
    import torch
    d = torch.einsum("ijkl,jr->irkl", t.to(dt), w_b.reshape(w_b.shape[0], -1).to(dt))
    return w_a.to(dt).t(), d.reshape(d.shape[0], -1)


def _whole(w, dt):
    """Exact (U, D) of a stored whole matrix with the smaller inner size."""
    import torch
    w = w.to(dt).reshape(w.shape[0], -1)
    a, b = w.shape
    if a <= b:
        return torch.eye(a, dtype=dt), w
    return w, torch.eye(b, dtype=dt)


def _capped(u, d):
    """Factors of inner size > min(m, n): the exact dense update as (ΔW, I) / (I, ΔW)."""
    import torch
    m, n = u.shape[0], d.shape[1]
    if u.shape[1] <= min(m, n):
        return u, d
    w = u @ d
    if n <= m:
        return w, torch.eye(n, dtype=w.dtype)
    return torch.eye(m, dtype=w.dtype), w


def _capped_dense(w):
    """A dense m×n update as exact factors of rank min(m, n): (ΔW, I) or (I, ΔW)."""
    import torch
    m, n = w.shape
    if n <= m:
        return w, torch.eye(n, dtype=w.dtype)
    return torch.eye(m, dtype=w.dtype), w


def oft_update(blocks, W, alpha: Optional[float]):
    """ComfyUI's OFT at strength 1: R_k = (I + Q_k)(I − Q_k)⁻¹ with Q = B − Bᵀ (scaled to ‖Q‖ ≤ alpha
    when alpha > 0), ΔW = blockdiag(R_kᵀ − I) · W (rows in blocks of the block size). An OFT ``.rescale``
    is not applied: ComfyUI 0.3.75 loads it but never uses it (its BOFT does apply one)."""
    import torch
    k, b, _ = blocks.shape
    q = blocks.to(torch.float64)
    q = q - q.transpose(1, 2)
    if alpha is not None and alpha > 0:
        qn = torch.linalg.norm(q) + 1e-8
        if qn > alpha:
            q = q * alpha / qn
    eye = torch.eye(b, dtype=torch.float64)
    r = (eye + q) @ torch.linalg.inv(eye - q)
    Wb = W.to(torch.float64).reshape(k, b, -1)
    d = torch.einsum("knm,knj->kmj", r - eye, Wb)
    return d.reshape(k * b, -1)


def factors(get: Callable[[str], "object"], family: str, roles: Dict[str, str]):
    """(up m×rank, down rank×n) of one LoHa/LoKr module; ``get(role)`` returns the stored tensor."""
    import torch
    if family == "diff":
        w = get("diff").to(torch.float64)
        return _capped_dense(w.reshape(w.shape[0], -1))
    if family == "loha":
        parts = []
        for i in ("1", "2"):
            a, b, t = get(f"hada_w{i}_a"), get(f"hada_w{i}_b"), (get(f"hada_t{i}") if f"hada_t{i}" in roles else None)
            parts.append((a, b, t))
        dt = _work_dtype(*(x for p in parts for x in p if x is not None))
        ud = []
        for a, b, t in parts:
            if t is not None:
                ud.append(_tucker(t, a, b, dt))
            else:
                ud.append((a.to(dt).reshape(a.shape[0], -1), b.to(dt).reshape(b.shape[0], -1)))
        (u1, d1), (u2, d2) = ud
        m, n = u1.shape[0], d1.shape[1]
        up = (u1[:, :, None] * u2[:, None, :]).reshape(m, -1)          # face-splitting product
        down = (d1[:, None, :] * d2[None, :, :]).reshape(-1, n)        # Khatri–Rao product
        return _capped(up, down)
    # LoKr
    raw = {r: get(r) for r in roles if r in LOKR_ROLES}
    dt = _work_dtype(*raw.values())
    ud = []
    for i in ("1", "2"):
        if f"lokr_w{i}" in raw:
            ud.append(_whole(raw[f"lokr_w{i}"], dt))
        elif f"lokr_t{i}" in raw:
            ud.append(_capped(*_tucker(raw[f"lokr_t{i}"], raw[f"lokr_w{i}_a"], raw[f"lokr_w{i}_b"], dt)))
        else:
            a, b = raw[f"lokr_w{i}_a"], raw[f"lokr_w{i}_b"]
            ud.append(_capped(a.to(dt).reshape(a.shape[0], -1), b.to(dt).reshape(b.shape[0], -1)))
    (u1, d1), (u2, d2) = ud
    c = torch.Tensor.contiguous
    return torch.kron(c(u1), c(u2)), torch.kron(c(d1), c(d2))
