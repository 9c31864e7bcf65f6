"""LyCORIS adapters whose update depends on the base weight: GLoRA, BOFT, and DoRA on LoHa / LoKr /
GLoRA / OFT / BOFT.

Each variant's update, read against a base weight W, is checked against what ComfyUI's own weight
adapters (``comfy.lora.load_lora`` + ``calculate_weight``, library mode) patch into the same W, and
against a float64 reference written here from the definitions (independently of ComfyUI's code and
of the reader: per-kernel-position products for GLoRA conv, explicit butterfly permutation matrices
and a linear solve for BOFT's Cayley transform, column/row norms for DoRA).
"""
from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from comfy_support import runtime

from domerge_core import LoraFormatError, UnsupportedFormatError, describe, load_lora, load_state_dict, merge

runtime.import_comfy_library()
import comfy.lora  # noqa: E402

LIN = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
LIN2 = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_k"
LIN3 = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_v"
CONV = "lora_unet_down_blocks_0_resnets_0_conv1"
KEYS = {LIN: "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
        LIN2: "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k",
        LIN3: "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_v",
        CONV: "unet.down_blocks.0.resnets.0.conv1"}
F64 = torch.float64


def _g(*shape, dtype=torch.float32, scale=1.0, seed=[100]):
    seed[0] += 1
    g = torch.Generator().manual_seed(seed[0])
    return (torch.randn(*shape, generator=g, dtype=F64) * scale).to(dtype)


def rel(a, b):
    return float((a - b).norm() / b.norm())


# ----------------------------------------------------------------------------------------------
# float64 references from the definitions
# ----------------------------------------------------------------------------------------------
def ref_glora(sd, name, W, old=False):
    """GLoRA: (alpha/r)·(W·a1·a2 + b1·b2), the a-product acting on the input channels at each kernel
    position (conv); old GLoRA: (alpha/r)·(b2·b1 + W_flat·a2·a1)."""
    d = {r: sd[f"{name}.{r}.weight"].double() for r in ("a1", "a2", "b1", "b2")}
    d = {r: t.reshape(t.shape[0], -1) for r, t in d.items()}
    W = W.double()
    m = W.shape[0]
    if old:
        r = d["a1"].shape[0]
        upd = d["b2"] @ d["b1"] + W.reshape(m, -1) @ d["a2"] @ d["a1"]
    else:
        r = d["a2"].shape[0]
        if W.dim() == 4:
            per_pos = W.permute(2, 3, 0, 1) @ d["a1"] @ d["a2"]           # (kh, kw, o, i)
            wa = per_pos.permute(2, 3, 0, 1).reshape(m, -1)
        else:
            wa = W @ d["a1"] @ d["a2"]
        upd = wa + d["b1"] @ d["b2"]
    alpha = float(sd[f"{name}.alpha"]) if f"{name}.alpha" in sd else None
    return (upd * (alpha / r if alpha is not None else 1.0)).reshape(W.shape)


def _cayley_ref(blocks, alpha):
    q = blocks.double() - blocks.double().transpose(-1, -2)
    if alpha > 0:
        n = math.sqrt(float((q ** 2).sum())) + 1e-8
        if n > alpha:
            q = q * (alpha / n)
    eye = torch.eye(q.shape[-1], dtype=F64).expand_as(q)
    # R = (I + Q)(I − Q)⁻¹ = ((I − Q)⁻ᵀ (I + Q)ᵀ)ᵀ
    return torch.linalg.solve((eye - q).transpose(-1, -2), (eye + q).transpose(-1, -2)).transpose(-1, -2)


def _butterfly_perm(m, b, i):
    """Stage i's row order: within each group of 2·2ⁱ·(b/2) rows, the two halves interleaved."""
    step = 2 ** i * (b // 2)
    order = []
    for start in range(0, m, 2 * step):
        for t in range(step):
            for s in range(2):
                order.append(start + s * step + t)
    P = torch.zeros(m, m, dtype=F64)
    P[torch.arange(m), torch.tensor(order)] = 1.0
    return P


def ref_boft(sd, name, W):
    blocks = sd[f"{name}.oft_blocks"]
    stages, k, b, _ = blocks.shape
    R = _cayley_ref(blocks, float(sd[f"{name}.alpha"]))
    m = W.shape[0]
    B = torch.eye(m, dtype=F64)
    for i in range(stages):
        P = _butterfly_perm(m, b, i)
        B = P.T @ torch.block_diag(*R[i]) @ P @ B
    out = (B @ W.double().reshape(m, -1)).reshape(W.shape)
    if f"{name}.rescale" in sd:
        out = out * sd[f"{name}.rescale"].double()
    return out - W.double()


def ref_oft(sd, name, W):
    blocks = sd[f"{name}.oft_blocks"]
    alpha = float(sd[f"{name}.alpha"]) if f"{name}.alpha" in sd else 0.0
    R = _cayley_ref(blocks, alpha)
    m = W.shape[0]
    return ((torch.block_diag(*R).T - torch.eye(m, dtype=F64)) @ W.double().reshape(m, -1)).reshape(W.shape)


def ref_dora(W, D, a, mag):
    """DoRA as ComfyUI's weight_decompose: (W + a·D)·m/(‖·‖ + eps of W's dtype), per input column of
    W + a·D, or per output row of W itself when there is one magnitude per output."""
    W64 = W.double()
    calc = W64 + a * D
    m = W.shape[0]
    eps = torch.finfo(W.dtype).eps
    if mag.shape[0] == m:
        norm = torch.stack([W64[j].norm() for j in range(m)]).reshape(m, 1)
    else:
        norm = torch.stack([calc[:, j].norm() for j in range(W.shape[1])]).reshape(1, -1)
    return calc * mag.double() / (norm + eps) - W64


# ----------------------------------------------------------------------------------------------
# variants: (state dict, module name, base weight, float64 reference, ComfyUI's dtype)
# ----------------------------------------------------------------------------------------------
def glora(m=24, n=40, r=3, alpha=2.0, name=LIN):
    sd = {f"{name}.a1.weight": _g(n, r), f"{name}.a2.weight": _g(r, n) * 0.3,
          f"{name}.b1.weight": _g(m, r), f"{name}.b2.weight": _g(r, n)}
    if alpha is not None:
        sd[f"{name}.alpha"] = torch.tensor(alpha)
    W = _g(m, n, dtype=F64)
    return sd, name, W, ref_glora(sd, name, W), F64


def glora_conv(o=32, c=8, r=2, alpha=4.0, four_d=False):
    name = CONV
    s1 = (1, 1) if four_d else ()
    sd = {f"{name}.a1.weight": _g(c, r, *s1), f"{name}.a2.weight": _g(r, c, *s1),
          f"{name}.b1.weight": _g(o, r, *s1), f"{name}.b2.weight": _g(r, c, 3, 3), f"{name}.alpha": torch.tensor(alpha)}
    W = _g(o, c, 3, 3, dtype=F64)
    return sd, name, W, ref_glora(sd, name, W), F64


def glora_old(m=24, n=40, r=3, alpha=3.0):
    name = LIN
    sd = {f"{name}.a1.weight": _g(r, n), f"{name}.a2.weight": _g(n, r),
          f"{name}.b1.weight": _g(r, n), f"{name}.b2.weight": _g(m, r), f"{name}.alpha": torch.tensor(alpha)}
    W = _g(m, n, dtype=F64)
    return sd, name, W, ref_glora(sd, name, W, old=True), F64


def glora_square():          # both of ComfyUI's shape tests pass: a2 rows ≠ W rows, so GLoRA
    return glora(m=20, n=20, r=3)


def glora_old_square():      # both pass, a2 rows = W rows and W square: old GLoRA
    sd, name, W, _, dt = glora_old(m=20, n=20, r=3)
    return sd, name, W, ref_glora(sd, name, W, old=True), dt


def boft(m=16, n=20, stages=2, b=4, alpha=0.0, rescale=False, conv=False, scale=0.1):
    name = CONV if conv else LIN
    sd = {f"{name}.oft_blocks": _g(stages, m // b, b, b) * scale, f"{name}.alpha": torch.tensor(alpha)}
    shape = (m, n // 4, 2, 2) if conv else (m, n)
    if rescale:
        sd[f"{name}.rescale"] = _g(m, *[1] * (len(shape) - 1)) * 0.1 + 1.0
    W = _g(*shape)           # float32: ComfyUI's BOFT inverts in float32 and fails on a float64 weight
    return sd, name, W, ref_boft(sd, name, W), torch.float32


VARIANTS = {
    "glora_linear": glora,
    "glora_no_alpha": lambda: glora(alpha=None),
    "glora_conv": glora_conv,
    "glora_conv_4d_factors": lambda: glora_conv(four_d=True),
    "glora_over_rank": lambda: glora(m=8, n=10, r=6),
    "glora_square": glora_square,
    "glora_old": glora_old,
    "glora_old_square": glora_old_square,
    "boft_linear": boft,
    "boft_three_stages": lambda: boft(m=32, stages=3),
    "boft_conv": lambda: boft(conv=True),
    "boft_rescale": lambda: boft(rescale=True),
    "boft_constrained": lambda: boft(alpha=0.5),
    "boft_block8": lambda: boft(m=32, b=8, stages=2),
}


def comfy_update(sd, name, W, dtype, strength=1.0):
    """What ComfyUI's LoraLoader path adds to the base weight W (computing in ``dtype``)."""
    patches = comfy.lora.load_lora(sd, {name: name + ".weight"}, log_missing=False)
    assert list(patches) == [name + ".weight"]
    w = W.to(dtype).clone()
    out = comfy.lora.calculate_weight([(strength, patches[name + ".weight"], 1.0, None, None)], w.clone(), name,
                                      intermediate_dtype=dtype)
    return (out - w).double()


def _base(W, name, seen=None):
    def fn(key, src):
        if seen is not None:
            seen.append((key, src))
        return W if key == KEYS[name] else None
    return fn


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_base_dependent_update_equals_comfyui_and_definition(variant):
    sd, name, W, ref, dt = VARIANTS[variant]()
    seen = []
    lora = load_state_dict(sd, source=f"{variant}.safetensors", base=_base(W, name, seen))
    mod = lora[KEYS[name]]
    assert mod.weight_shape == tuple(W.shape)
    up, down = mod.factors(F64)
    m, n = W.shape[0], W[0].numel()
    assert up.shape == (m, mod.rank) and down.shape == (mod.rank, n) and mod.rank <= min(m, n)
    if variant in ("glora_linear", "glora_old", "glora_no_alpha"):
        assert mod.rank == 6                      # exactly 2r: no dense m×n update
    if variant == "glora_conv":
        assert mod.rank == 2 * 9 + 2              # r·kh·kw + r
    ours = mod.delta(F64).reshape(W.shape)
    assert (KEYS[name], name) in seen
    e_ref = rel(ours, ref)
    theirs = comfy_update(sd, name, W, dt)
    assert theirs.abs().max() > 0, "ComfyUI patched nothing (its adapters log errors and carry on)"
    e_comfy = rel(ours, theirs)
    print(f"{variant}: vs definition {e_ref:.1e}, vs ComfyUI ({dt}) {e_comfy:.1e}")
    assert e_ref < 1e-12, variant
    assert e_comfy < (1e-12 if dt == F64 else 1e-5), variant


def test_boft_strength_is_not_linear_in_comfyui():
    """Documented: a merge weight scales ΔW(1); ComfyUI's BOFT strength s mixes each stage with I."""
    sd, name, W, ref, dt = boft(scale=0.5)
    half = comfy_update(sd, name, W, dt, strength=0.5)
    assert rel(half, 0.5 * ref) > 1e-3
    lo = load_state_dict(sd, source="b.safetensors", base=_base(W, name))
    assert rel(0.5 * lo[KEYS[name]].delta(F64).reshape(W.shape), 0.5 * ref) < 1e-12


def test_glora_uses_its_own_alpha_rule():
    """GLoRA's scale is alpha / a2 rows (old: a1 rows), not LoRA's alpha / down rows."""
    sd, name, W, ref, _ = glora(r=3, alpha=2.0)
    assert load_state_dict(sd, source="g.safetensors", base=_base(W, name))[KEYS[name]].scale == pytest.approx(2 / 3)
    sd, name, W, ref, _ = glora_old(r=4, alpha=2.0)
    assert load_state_dict(sd, source="g.safetensors", base=_base(W, name))[KEYS[name]].scale == pytest.approx(0.5)


# ----------------------------------------------------------------------------------------------
# DoRA on every adapter ComfyUI decomposes
# ----------------------------------------------------------------------------------------------
def _loha_sd(name, m, n, alpha=5.0):
    sd = {f"{name}.hada_w1_a": _g(m, 3), f"{name}.hada_w1_b": _g(3, n) * 0.2,
          f"{name}.hada_w2_a": _g(m, 2), f"{name}.hada_w2_b": _g(2, n) * 0.2, f"{name}.alpha": torch.tensor(alpha)}
    d = lambda k: sd[f"{name}.{k}"].double()  # noqa: E731
    D = (d("hada_w1_a") @ d("hada_w1_b")) * (d("hada_w2_a") @ d("hada_w2_b"))
    return sd, D, alpha / 3


def _lokr_sd(name, m, n, alpha=6.0):
    a, b = 4, 5
    sd = {f"{name}.lokr_w1": _g(a, b) * 0.3, f"{name}.lokr_w2_a": _g(m // a, 3) * 0.3,
          f"{name}.lokr_w2_b": _g(3, n // b) * 0.3, f"{name}.alpha": torch.tensor(alpha)}
    D = torch.kron(sd[f"{name}.lokr_w1"].double(), sd[f"{name}.lokr_w2_a"].double() @ sd[f"{name}.lokr_w2_b"].double())
    return sd, D, alpha / 3


def dora_case(kind, axis, m=24, n=40, oft_alpha=0.05):
    name = LIN
    oft_alpha = float(torch.tensor(oft_alpha))        # the value as stored (float32), as readers see it
    if kind in ("oft", "oft_alpha0", "boft"):
        W = _g(m, n)                                  # ComfyUI's OFT/BOFT work in float32
        dt = torch.float32
    else:
        W = _g(m, n, dtype=F64)
        dt = F64
    if kind == "loha":
        sd, D, a = _loha_sd(name, m, n)
    elif kind == "lokr":
        sd, D, a = _lokr_sd(name, m, n)
    elif kind == "glora":
        sd, _, _, _, _ = glora(m, n, r=3, alpha=2.0)
        a = 2.0 / 3
        D = ref_glora({k: v for k, v in sd.items() if not k.endswith(".alpha")}, name, W)
    elif kind.startswith("oft"):
        sd = {f"{name}.oft_blocks": _g(6, 4, 4) * 0.1}
        if kind == "oft":
            sd[f"{name}.alpha"] = torch.tensor(oft_alpha)
        D = ref_oft(sd, name, W)
        a = oft_alpha if kind == "oft" else 0.0       # ComfyUI passes OFT's constraint as DoRA's alpha
    else:
        sd = {f"{name}.oft_blocks": _g(2, 6, 4, 4) * 0.1, f"{name}.alpha": torch.tensor(oft_alpha),
              f"{name}.rescale": _g(m, 1) * 0.1 + 1.0}
        D = ref_boft(sd, name, W)
        a = oft_alpha
    mag = (_g(m, 1).abs() + 0.5) if axis == "out" else (_g(1, n).abs() + 0.5)
    sd[f"{name}.dora_scale"] = mag
    return sd, name, W, ref_dora(W, D, a, mag), dt


DORA = [(k, ax) for k in ("loha", "lokr", "glora", "oft", "oft_alpha0", "boft") for ax in ("in", "out")]


@pytest.mark.parametrize("kind,axis", DORA)
def test_dora_on_lycoris_equals_comfyui_and_definition(kind, axis):
    sd, name, W, ref, dt = dora_case(kind, axis)
    with pytest.raises(UnsupportedFormatError) as e:                    # no base: refused, naming the key
        load_state_dict(sd, source="dora.safetensors")
    assert e.value.file == "dora.safetensors" and e.value.key and "base model" in str(e.value)
    lora = load_state_dict(sd, source="dora.safetensors", base=_base(W, name))
    mod = lora[KEYS[name]]
    ours = mod.delta(F64).reshape(W.shape)
    theirs = comfy_update(sd, name, W, dt)
    assert theirs.abs().max() > 0
    e_ref, e_comfy = rel(ours, ref), rel(ours, theirs)
    print(f"DoRA on {kind} ({axis} axis): vs definition {e_ref:.1e}, vs ComfyUI ({dt}) {e_comfy:.1e}")
    assert e_ref < 1e-12, (kind, axis)
    assert e_comfy < (1e-12 if dt == F64 else 1e-5), (kind, axis)


def test_describe_names_the_base_dependent_types(tmp_path):
    sd = {}
    sd.update(glora(name=LIN)[0])
    sd.update({k.replace(LIN, LIN2): v for k, v in boft(m=24, n=40)[0].items()})
    sd.update({k.replace(LIN, LIN3): v for k, v in dora_case("loha", "in")[0].items()})
    p = tmp_path / "mixed.safetensors"
    save_file(sd, str(p))
    with pytest.raises(UnsupportedFormatError, match="base model"):
        describe(str(p))
    shapes = {KEYS[LIN]: (24, 40), KEYS[LIN2]: (24, 40), KEYS[LIN3]: (24, 40)}
    base = lambda key, name: None  # noqa: E731
    base.shape = lambda key, name: shapes.get(key)
    d = describe(str(p), base=base)                       # header only: the base's shapes
    assert d["adapters"] == {"glora": 1, "boft": 1, "loha+dora": 1} and d["modules"] == 3


# ----------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------
def test_glora_and_boft_without_base_are_refused_naming_file_and_key():
    for sd, name, *_ in (glora(), boft()):
        with pytest.raises(UnsupportedFormatError) as e:
            load_state_dict(sd, source="x.safetensors")
        assert e.value.file == "x.safetensors" and e.value.key.startswith(name)
        assert "base model" in str(e.value) and ("GLoRA" in str(e.value) or "BOFT" in str(e.value))
        with pytest.raises(LoraFormatError) as e:          # a base without this module's weight
            load_state_dict(sd, source="x.safetensors", base=lambda key, src: None)
        assert e.value.key.startswith(name) and "base weight was not found" in str(e.value)


def test_boft_without_alpha_is_refused():
    """ComfyUI 0.3.75 fails on it (``None > 0``), logs an error and patches nothing."""
    sd, name, W, _, _ = boft()
    del sd[f"{name}.alpha"]
    assert comfy_update(sd, name, W, torch.float32).abs().max() == 0
    with pytest.raises(LoraFormatError) as e:
        load_state_dict(sd, source="b.safetensors", base=_base(W, name))
    assert e.value.key == f"{name}.oft_blocks" and "alpha" in str(e.value)


def test_bad_glora_and_boft_shapes_name_the_key():
    sd, name, W, _, _ = glora()
    sd[f"{name}.b2.weight"] = _g(3, 41)
    with pytest.raises(LoraFormatError) as e:
        load_state_dict(sd, source="g.safetensors", base=_base(W, name))
    assert e.value.file == "g.safetensors" and e.value.key == f"{name}.a1.weight" and "GLoRA" in str(e.value)
    name, W = LIN, _g(24, 20)                                  # stage 2 needs a multiple of 16 rows
    sd = {f"{name}.oft_blocks": _g(3, 6, 4, 4), f"{name}.alpha": torch.tensor(0.0)}
    with pytest.raises(LoraFormatError, match="butterfly stage 2") as e:
        load_state_dict(sd, source="b.safetensors", base=_base(W, name))
    assert e.value.key == f"{name}.oft_blocks"
    sd, name, W, _, _ = boft(rescale=True)
    sd[f"{name}.rescale"] = _g(3, 1)
    with pytest.raises(LoraFormatError, match="rescale") as e:
        load_state_dict(sd, source="b.safetensors", base=_base(W, name))
    assert e.value.key == f"{name}.rescale"
    sd, name, W, _, _ = glora()
    del sd[f"{name}.b2.weight"]
    with pytest.raises(LoraFormatError, match="b2"):
        load_state_dict(sd, source="g.safetensors", base=_base(W, name))


# ----------------------------------------------------------------------------------------------
# merging
# ----------------------------------------------------------------------------------------------
def _mixed(m=24, n=40):
    """GLoRA (to_q) + BOFT with rescale (to_k) + DoRA-LoHa (to_v) in one file, float32 bases."""
    Ws = {KEYS[x]: _g(m, n) for x in (LIN, LIN2, LIN3)}
    sd, refs = {}, {}
    g_sd, *_ = glora(m, n, r=3, alpha=2.0)
    sd.update(g_sd)
    refs[KEYS[LIN]] = ref_glora(g_sd, LIN, Ws[KEYS[LIN]])
    b_sd = {k.replace(LIN, LIN2): v for k, v in boft(m, n, rescale=True, alpha=0.05)[0].items()}
    sd.update(b_sd)
    refs[KEYS[LIN2]] = ref_boft(b_sd, LIN2, Ws[KEYS[LIN2]])
    l_sd, D, a = _loha_sd(LIN3, m, n)
    mag = _g(1, n).abs() + 0.5
    l_sd[f"{LIN3}.dora_scale"] = mag
    sd.update(l_sd)
    refs[KEYS[LIN3]] = ref_dora(Ws[KEYS[LIN3]], D, a, mag)
    return sd, Ws, refs


def test_merge_of_glora_boft_dora_loha_with_plain_lora_equals_dense_sum(tmp_path):
    m, n = 24, 40
    sd, Ws, refs = _mixed(m, n)
    plain, prefs = {}, {}
    for name in (LIN, LIN2, LIN3):
        down, up = _g(4, n), _g(m, 4)
        plain.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
                      f"{name}.alpha": torch.tensor(2.0)})
        prefs[KEYS[name]] = up.double() @ down.double() * 0.5
    save_file(sd, str(tmp_path / "mixed.safetensors"))
    save_file(plain, str(tmp_path / "plain.safetensors"))
    base = lambda key, src: Ws.get(key)  # noqa: E731
    inputs = [load_lora(str(tmp_path / "mixed.safetensors"), base=base), load_lora(str(tmp_path / "plain.safetensors"))]
    w = [0.7, -0.4]
    res = merge(inputs, "ta", weights=w, rank=min(m, n), device="cpu", compute_dtype=F64)
    worst = 0.0
    for key in refs:
        want = w[0] * refs[key] + w[1] * prefs[key]
        worst = max(worst, rel(res.lora[key].delta(F64).reshape(m, n), want))
    print(f"GLoRA+BOFT+DoRA-LoHa+LoRA 'ta' vs dense float64: {worst:.1e}")
    assert worst < 1e-10


def test_cli_base_feeds_glora_and_boft(tmp_path):
    """``domerge merge --base ckpt`` reads GLoRA and BOFT inputs against an SGM checkpoint's weights;
    ``domerge inspect --base`` names them."""
    import json
    import contextlib
    import io

    from domerge_core.cli import main

    pin, pout = "lora_unet_input_blocks_4_1_proj_in", "lora_unet_input_blocks_4_1_proj_out"
    m, n = 24, 40
    g_sd = {k.replace(LIN, pin): v for k, v in glora(m, n)[0].items()}
    b_sd = {k.replace(LIN, pout): v for k, v in boft(m, n, alpha=0.05, rescale=True)[0].items()}
    W1, W2 = _g(m, n), _g(m, n)
    save_file({**g_sd, **b_sd}, str(tmp_path / "lyco.safetensors"))
    save_file({"model.diffusion_model.input_blocks.4.1.proj_in.weight": W1,
               "model.diffusion_model.input_blocks.4.1.proj_out.weight": W2}, str(tmp_path / "ckpt.safetensors"))
    out = tmp_path / "out.safetensors"
    assert main(["merge", str(tmp_path / "lyco.safetensors"), "-o", str(out), "--method", "ta",
                 "--weights", "0.5", "-q"]) == 2                                   # refused without --base
    assert main(["merge", str(tmp_path / "lyco.safetensors"), "-o", str(out), "--method", "ta", "--weights", "0.5",
                 "--base", str(tmp_path / "ckpt.safetensors"), "--dtype", "fp32", "-q"]) == 0
    got = load_lora(str(out))
    for name, key, W, sd in ((pin, "unet.down_blocks.1.attentions.0.proj_in", W1, g_sd),
                             (pout, "unet.down_blocks.1.attentions.0.proj_out", W2, b_sd)):
        want = 0.5 * comfy_update(sd, name, W, torch.float32)                   # a merge weight scales ΔW(1)
        assert rel(got[key].delta(F64), want) < 1e-5, name
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["inspect", str(tmp_path / "lyco.safetensors"), "--base", str(tmp_path / "ckpt.safetensors"),
                     "--json"]) == 0
    assert json.loads(buf.getvalue())["files"][0]["adapters"] == {"glora": 1, "boft": 1}


# ----------------------------------------------------------------------------------------------
# end to end on the tiny SD1.5 in ComfyUI library mode: merge node with MODEL, stock LoraLoader
# ----------------------------------------------------------------------------------------------
def _tiny_base_dependent(shapes, targets):
    """GLoRA, BOFT (with rescale) and DoRA-LoHa on attention modules, GLoRA on a 3×3 resnet conv."""
    from comfy_support import tiny_sd15 as t

    g = torch.Generator().manual_seed(11)
    rnd = lambda *s, k=0.1: torch.randn(*s, generator=g) * k  # noqa: E731
    sd = {}
    attn = t._pick(targets, t._ATTN)
    conv = t._pick(targets, t._CONV, resnet_only=True)
    kinds = ["glora", "boft", "dora_loha", "glora", "boft", "dora_loha"]
    for (diff_path, ckey), kind in list(zip(attn, kinds)) + [(conv[0], "glora")]:
        shape = shapes[ckey]
        m, c = shape[0], shape[1]
        n = math.prod(shape[1:])
        base = "lora_unet_" + diff_path.replace(".", "_")
        if kind == "glora":
            sd.update({base + ".a1.weight": rnd(c, 4), base + ".a2.weight": rnd(4, c),
                       base + ".b1.weight": rnd(m, 4), base + ".b2.weight": rnd(4, *shape[1:], k=0.02),
                       base + ".alpha": torch.tensor(2.0)})
        elif kind == "boft":
            sd.update({base + ".oft_blocks": rnd(2, m // 8, 8, 8), base + ".alpha": torch.tensor(0.5),
                       base + ".rescale": 1.0 + rnd(m, 1)})
        else:
            sd.update({base + ".hada_w1_a": rnd(m, 2, k=0.3), base + ".hada_w1_b": rnd(2, n, k=0.3),
                       base + ".hada_w2_a": rnd(m, 2, k=0.3), base + ".hada_w2_b": rnd(2, n, k=0.3),
                       base + ".alpha": torch.tensor(2.0), base + ".dora_scale": torch.rand(1, n, generator=g) + 0.5})
    return sd


def test_merge_node_with_model_reads_glora_boft_dora_loha_and_stock_loraloader_loads_the_output(tmp_path, caplog):
    """GLoRA + BOFT + DoRA-LoHa file and a kohya LoRA: the merge node with MODEL/CLIP connected ('ta',
    full rank) → Save node → stock LoraLoader at 1.0 patches what stock LoraLoader chained on the two
    input files patches (the base-dependent file first: ComfyUI applies later patches to the weight
    the earlier ones left), with zero skipped keys."""
    import logging

    from comfy_support import library
    from comfy_support import tiny_sd15 as t
    import domerge_nodes
    import folder_paths
    import nodes as comfy_nodes

    dirs = library.setup_folders(tmp_path)
    loras = library.tiny_loras(dirs["loras"])
    save_file(_tiny_base_dependent(t._meta_shapes(), t._unet_targets()), str(dirs["loras"] / "lyco.safetensors"))
    folder_paths.filename_list_cache.clear()
    model, clip, _ = library.load_checkpoint()
    strengths = [("lyco", 1.0), ("tiny_kohya_a", 0.5)]
    listed = domerge_nodes.NODE_CLASS_MAPPINGS["DomergeLoraList"]()
    (entries,) = listed.build("lyco.safetensors", 1.0)
    (entries,) = listed.build(loras["tiny_kohya_a"].name, 0.5, loras=entries)
    node = domerge_nodes.NODE_CLASS_MAPPINGS["DomergeMergeLoras"]()
    widgets = {k: v[1]["default"] for k, v in node.INPUT_TYPES()["required"].items()
               if k not in ("loras", "method") and isinstance(v[1], dict) and "default" in v[1]}
    merged, _ = node.merge(entries, "ta", model=model, clip=clip, **widgets)
    saver = domerge_nodes.NODE_CLASS_MAPPINGS["DomergeSaveLora"]()
    (name,) = saver.save(merged, "merged_base", "kohya", "fp32")["result"]
    folder_paths.filename_list_cache.clear()
    loader = comfy_nodes.LoraLoader()
    with caplog.at_level(logging.WARNING):
        m_ref, c_ref = model, clip
        for n, s in strengths:
            m_ref, c_ref = loader.load_lora(m_ref, c_ref, f"{n}.safetensors", s, s)
        m_got, c_got = loader.load_lora(model, clip, name, 1.0, 1.0)
    assert "lora key not loaded" not in caplog.text and "ERROR" not in caplog.text, caplog.text[-2000:]
    assert set(load_file(str(dirs["loras"] / name))) and set(m_got.patches) == set(m_ref.patches)
    worst = 0.0
    for got_p, ref_p, base_p in ((m_got, m_ref, model), (c_got.patcher, c_ref.patcher, clip.patcher)):
        for key in ref_p.patches:
            b = library.patched_weight(base_p, key)
            worst = max(worst, rel(library.patched_weight(got_p, key) - b, library.patched_weight(ref_p, key) - b))
    print(f"GLoRA+BOFT+DoRA-LoHa+LoRA via node vs stock LoraLoader chain: worst rel err {worst:.2e}")
    assert worst < 1e-5, worst
