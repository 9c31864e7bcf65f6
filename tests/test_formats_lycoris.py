"""LyCORIS LoHa / LoKr read as exact low-rank modules.

Each variant's dense update ``scale · up @ down`` is checked against what ComfyUI's own weight
adapters (``comfy.lora.load_lora`` + ``calculate_weight``, library mode) patch into the same zero base
weight, and merges containing them against a dense float64 reference built from the raw tensors.
"""
from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file

from comfy_support import runtime

from domerge_core import LoraFormatError, UnsupportedFormatError, load_lora, load_state_dict, merge

runtime.import_comfy_library()
import comfy.lora  # noqa: E402

LIN = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"        # 640 -> smaller here
CONV = "lora_unet_down_blocks_0_resnets_0_conv1"
LIN_KEY = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
CONV_KEY = "unet.down_blocks.0.resnets.0.conv1"


def _g(*shape, dtype=torch.float32, seed=[0]):
    seed[0] += 1
    g = torch.Generator().manual_seed(seed[0])
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


# ----------------------------------------------------------------------------------------------
# variants: (state dict, module name, base weight shape, dense float64 reference)
# The references are written from the LyCORIS definitions, independently of ComfyUI and of the reader.
# ----------------------------------------------------------------------------------------------
def loha(m=24, n=40, r1=3, r2=2, alpha=5.0, dtype=torch.float32, name=LIN):
    sd = {f"{name}.hada_w1_a": _g(m, r1, dtype=dtype), f"{name}.hada_w1_b": _g(r1, n, dtype=dtype),
          f"{name}.hada_w2_a": _g(m, r2, dtype=dtype), f"{name}.hada_w2_b": _g(r2, n, dtype=dtype)}
    if alpha is not None:
        sd[f"{name}.alpha"] = torch.tensor(alpha)
    d = lambda k: sd[f"{name}.{k}"].double()  # noqa: E731
    ref = (d("hada_w1_a") @ d("hada_w1_b")) * (d("hada_w2_a") @ d("hada_w2_b")) * ((alpha or r1) / r1)
    return sd, name, (m, n), ref


def loha_conv(o=16, c=8, r1=2, r2=3, alpha=2.0):
    sd, name, _, ref = loha(o, c * 9, r1, r2, alpha, name=CONV)
    return sd, name, (o, c, 3, 3), ref.reshape(o, c, 3, 3)


def loha_tucker(o=16, c=8, k=3, r1=3, r2=2, alpha=4.0):
    name = CONV
    sd = {}
    ref = None
    for i, r in (("1", r1), ("2", r2)):
        t, a, b = _g(r, r, k, k), _g(r, o), _g(r, c)
        sd.update({f"{name}.hada_t{i}": t, f"{name}.hada_w{i}_a": a, f"{name}.hada_w{i}_b": b})
        # W[p, q, x, y] = Σ_ij t[i,j,x,y] a[i,p] b[j,q]
        w = torch.einsum("ijxy,ip,jq->pqxy", t.double(), a.double(), b.double())
        ref = w if ref is None else ref * w
    sd[f"{name}.alpha"] = torch.tensor(alpha)
    return sd, name, (o, c, k, k), ref * (alpha / r1)


def loha_over_rank(m=12, n=10, r1=4, r2=4):      # r1·r2 = 16 > min(m, n): dense path, exact
    return loha(m, n, r1, r2, alpha=3.0)


def _kron_ref(w1, w2):
    w1 = w1.double()
    w2 = w2.double().contiguous()
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    return torch.kron(w1, w2)


def lokr(w1="whole", w2="factored", a=4, b=5, c=6, d=8, r1=2, r2=3, alpha=6.0, dtype=torch.float32,
         name=LIN, conv=None):
    sd = {}
    kk = conv or ()
    if w1 == "whole":
        W1 = _g(a, b, dtype=dtype)
        sd[f"{name}.lokr_w1"] = W1
    else:
        A, B = _g(a, r1, dtype=dtype), _g(r1, b, dtype=dtype)
        sd[f"{name}.lokr_w1_a"], sd[f"{name}.lokr_w1_b"] = A, B
        W1 = A.double() @ B.double()
    if w2 == "whole":
        W2 = _g(c, d, *kk, dtype=dtype)
        sd[f"{name}.lokr_w2"] = W2
    elif w2 == "tucker":
        t, A, B = _g(r2, r2, *kk, dtype=dtype), _g(r2, c, dtype=dtype), _g(r2, d, dtype=dtype)
        sd[f"{name}.lokr_t2"], sd[f"{name}.lokr_w2_a"], sd[f"{name}.lokr_w2_b"] = t, A, B
        W2 = torch.einsum("ijxy,ip,jq->pqxy", t.double(), A.double(), B.double())
    else:
        flat = d * (kk[0] * kk[1] if kk else 1)
        A, B = _g(c, r2, dtype=dtype), _g(r2, flat, dtype=dtype)
        sd[f"{name}.lokr_w2_a"], sd[f"{name}.lokr_w2_b"] = A, B
        W2 = (A.double() @ B.double()).reshape(c, d, *kk)
    if alpha is not None:
        sd[f"{name}.alpha"] = torch.tensor(alpha)
    dim = r2 if w2 != "whole" else (r1 if w1 != "whole" else None)
    scale = alpha / dim if (alpha is not None and dim) else 1.0
    shape = (a * c, b * d, *kk)
    return sd, name, shape, (_kron_ref(W1, W2) * scale).reshape(shape)


def diff(shape=(12, 20), name=LIN, dtype=torch.float32):
    sd = {f"{name}.diff": _g(*shape, dtype=dtype)}
    return sd, name, shape, sd[f"{name}.diff"].double()


VARIANTS = {
    "diff_linear_wide": diff,
    "diff_linear_tall": lambda: diff((20, 12)),
    "diff_conv": lambda: diff((6, 4, 3, 3), name=CONV),
    "diff_bf16": lambda: diff(dtype=torch.bfloat16),
    "loha": loha,
    "loha_fp16": lambda: loha(dtype=torch.float16),
    "loha_bf16": lambda: loha(dtype=torch.bfloat16),
    "loha_no_alpha": lambda: loha(alpha=None),
    "loha_conv_flat_kernel": loha_conv,
    "loha_tucker_conv": loha_tucker,
    "loha_over_rank": loha_over_rank,
    "lokr_w1_whole_w2_factored": lokr,
    "lokr_w1_factored_w2_factored": lambda: lokr(w1="factored"),
    "lokr_w1_factored_w2_whole": lambda: lokr(w1="factored", w2="whole"),
    "lokr_both_whole_alpha_ignored": lambda: lokr(w2="whole"),
    "lokr_no_alpha": lambda: lokr(alpha=None),
    "lokr_fp16": lambda: lokr(dtype=torch.float16),
    "lokr_tall_w1": lambda: lokr(a=7, b=2, c=4, d=9),
    "lokr_over_rank_w2": lambda: lokr(c=3, d=4, r2=5),
    "lokr_conv_w2_whole_4d": lambda: lokr(name=CONV, conv=(3, 3), w2="whole", c=4, d=2),
    "lokr_conv_w2_factored_flat": lambda: lokr(name=CONV, conv=(3, 3), c=4, d=2),
    "lokr_conv_tucker": lambda: lokr(name=CONV, conv=(3, 3), w2="tucker", c=4, d=2),
}


# ComfyUI 0.3.75's LoKr Tucker path fails under this torch: ``torch.kron`` of the non-contiguous einsum
# result raises, ComfyUI logs "ERROR lokr ..." and leaves the weight unpatched. Checked against the
# LyCORIS definition only (and the failure itself is asserted, so a fixed ComfyUI turns this red).
COMFY_FAILS = {"lokr_conv_tucker"}


def comfy_patch(sd, name, shape):
    """What ComfyUI's LoraLoader path adds to a zero weight of ``shape`` (float64)."""
    patches = comfy.lora.load_lora(sd, {name: name + ".weight"}, log_missing=False)
    assert list(patches) == [name + ".weight"]
    w = torch.zeros(shape, dtype=torch.float64)
    return comfy.lora.calculate_weight([(1.0, patches[name + ".weight"], 1.0, None, None)], w, name,
                                       intermediate_dtype=torch.float64)


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_reading_equals_comfyui_patch_and_definition(variant):
    sd, name, shape, ref = VARIANTS[variant]()
    lora = load_state_dict(sd, source=f"{variant}.safetensors")
    assert len(lora) == 1
    mod = next(iter(lora))
    assert mod.weight_shape == tuple(shape)
    up, down = mod.factors(torch.float64)
    assert up.shape == (shape[0], mod.rank) and down.shape == (mod.rank, math.prod(shape[1:]))
    assert mod.rank <= min(up.shape[0], down.shape[1])
    ours = mod.delta(torch.float64).reshape(shape)
    assert rel(ours, ref) < 1e-12, variant      # exact up to float64 rounding
    theirs = comfy_patch(sd, name, shape)
    if variant in COMFY_FAILS:
        assert theirs.abs().max() == 0
        return
    assert theirs.abs().max() > 0, "ComfyUI patched nothing (its adapters log errors and carry on)"
    assert rel(ours, theirs) < 1e-12, variant   # ComfyUI computes in float64 here (intermediate_dtype)


def test_ranks_are_the_structural_ones():
    sd, *_ = loha(m=24, n=40, r1=3, r2=2)
    assert next(iter(load_state_dict(sd))).rank == 6                       # r1·r2
    sd, *_ = loha_over_rank(m=12, n=10, r1=4, r2=4)
    assert next(iter(load_state_dict(sd))).rank == 10                      # capped at min(m, n)
    sd, *_ = lokr(a=4, b=5, c=6, d=8, r2=3)
    assert next(iter(load_state_dict(sd))).rank == 4 * 3                  # min(a,b)·r2
    sd, *_ = lokr(w1="factored", a=4, b=5, r1=2, r2=3)
    assert next(iter(load_state_dict(sd))).rank == 2 * 3
    sd, *_ = lokr(w1="factored", w2="whole", a=4, b=5, r1=2, c=6, d=8)
    assert next(iter(load_state_dict(sd))).rank == 2 * 6                  # full W2: min(c, d)
    sd, *_ = lokr(name=CONV, conv=(3, 3), w2="whole", c=4, d=2)
    m = next(iter(load_state_dict(sd)))
    assert m.kind == "conv" and m.kernel_size == (3, 3) and m.rank == 4 * 4


def test_flattened_conv_gets_its_kernel_from_the_module_name():
    sd, *_ = loha_conv(o=16, c=8)
    m = load_state_dict(sd)[CONV_KEY]
    assert m.kind == "conv" and m.kernel_size == (3, 3) and m.weight_shape == (16, 8, 3, 3)
    sd, *_ = loha(m=16, n=72)              # same widths on a linear layer stay linear
    m = load_state_dict(sd)[LIN_KEY]
    assert m.kind == "linear" and m.weight_shape == (16, 72)


def test_flux_fused_qkv_loha_is_split_like_plain_lora():
    """A LoHa on BFL Flux's fused qkv splits into to_q/to_k/to_v by up rows, like a LoRA does."""
    name = "lora_unet_double_blocks_0_img_attn_qkv"
    h = 3072
    sd, _, _, ref = loha(m=3 * h, n=h, r1=2, r2=2, name=name)
    lora = load_state_dict(sd)
    keys = sorted(k for k in lora.modules if k.startswith("transformer.transformer_blocks.0.attn.to_"))
    assert keys == ["transformer.transformer_blocks.0.attn.to_k", "transformer.transformer_blocks.0.attn.to_q",
                    "transformer.transformer_blocks.0.attn.to_v"]
    for i, p in enumerate(("to_q", "to_k", "to_v")):
        m = lora[f"transformer.transformer_blocks.0.attn.{p}"]
        up, down = m.scaled_factors(torch.float64)
        # compare on a few rows to keep the test light
        assert rel(up[:32] @ down, ref[i * h: i * h + 32]) < 1e-10


def test_file_round_trip_and_merge_against_dense_float64(tmp_path):
    """LoHa + LoKr + plain LoRA + full .diff on one layer: task arithmetic and the file written from it equal the
    float64 sum of the references; the output is a plain LoRA that ComfyUI loads with no skipped key."""
    m, n = 24, 40
    sd1, name, shape, ref1 = loha(m, n, 3, 2, alpha=5.0)
    sd2, _, _, ref2 = lokr(a=4, b=5, c=6, d=8, r2=3)
    down, up = _g(4, n), _g(m, 4)
    sd3 = {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(2.0)}
    ref3 = up.double() @ down.double() * 0.5
    sd4, _, _, ref4 = diff((m, n))
    paths = []
    for i, sd in enumerate((sd1, sd2, sd3, sd4)):
        p = tmp_path / f"in{i}.safetensors"
        save_file(sd, str(p))
        paths.append(str(p))
    w = [0.7, 1.3, -0.4, 0.25]
    # rank min(m, n): exact here (Σ input ranks = 46 > 24; the engine would write rank 46 otherwise)
    res = merge(paths, "ta", weights=w, rank=min(m, n), device="cpu", compute_dtype=torch.float64)
    want = w[0] * ref1 + w[1] * ref2 + w[2] * ref3 + w[3] * ref4
    got = res.lora[LIN_KEY].delta(torch.float64)
    assert rel(got, want) < 1e-10
    out = tmp_path / "merged.safetensors"
    res.save(str(out)) if hasattr(res, "save") else __import__("domerge_core").save_lora(res.lora, str(out))
    back = load_lora(str(out))
    assert rel(back[LIN_KEY].delta(torch.float64), want) < 1e-5
    from safetensors.torch import load_file
    merged_sd = load_file(str(out))
    kname = [k for k in merged_sd if k.endswith(".lora_down.weight")][0][: -len(".lora_down.weight")]
    patches = comfy.lora.load_lora(merged_sd, {kname: kname + ".weight"}, log_missing=False)
    loaded = set()
    for p in patches.values():
        loaded |= set(p.loaded_keys)
    assert set(merged_sd) == loaded                 # every key of the output is used by ComfyUI


def test_do_merge_of_lycoris_inputs_equals_merge_of_their_dense_updates_as_loras():
    """DO-Merging reads LoHa/LoKr only through (up, down): the result equals the merge of plain LoRAs
    holding exactly those factors."""
    sd1, name, shape, ref1 = loha(24, 40, 3, 2)
    sd2, *_ = lokr(a=4, b=5, c=6, d=8, r2=3)
    a, b = load_state_dict(sd1, source="a.safetensors"), load_state_dict(sd2, source="b.safetensors")
    plain = []
    for lo, src in ((a, "pa.safetensors"), (b, "pb.safetensors")):
        up, down = next(iter(lo)).scaled_factors(torch.float64)
        plain.append(load_state_dict({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up}, source=src))
    r1 = merge([a, b], "do", device="cpu", compute_dtype=torch.float64)
    r2 = merge(plain, "do", device="cpu", compute_dtype=torch.float64)
    d1, d2 = r1.lora[LIN_KEY].delta(torch.float64), r2.lora[LIN_KEY].delta(torch.float64)
    assert rel(d1, d2) < 1e-10


# ----------------------------------------------------------------------------------------------
# bad input: a clear error naming file and key
# ----------------------------------------------------------------------------------------------
def test_incomplete_loha_names_the_missing_tensor(tmp_path):
    sd, name, *_ = loha()
    del sd[f"{name}.hada_w2_b"]
    p = tmp_path / "broken_loha.safetensors"
    save_file(sd, str(p))
    with pytest.raises(LoraFormatError) as e:
        load_lora(str(p))
    assert e.value.file == str(p) and "hada_w2_b" in str(e.value) and "LoHa" in str(e.value)


def test_loha_shape_mismatch_names_file_and_key():
    sd, name, *_ = loha(m=24, n=40)
    sd[f"{name}.hada_w2_b"] = _g(2, 41)
    with pytest.raises(LoraFormatError) as e:
        load_state_dict(sd, source="x.safetensors")
    assert e.value.file == "x.safetensors" and e.value.key is not None and "disagree" in str(e.value)


def test_lokr_missing_w2_and_mixed_storage():
    sd, name, *_ = lokr()
    del sd[f"{name}.lokr_w2_a"]
    with pytest.raises(LoraFormatError, match="lokr_w2_a"):
        load_state_dict(sd, source="x.safetensors")
    sd, name, *_ = lokr()
    sd[f"{name}.lokr_w2"] = _g(6, 8)
    with pytest.raises(LoraFormatError, match="both whole and factored"):
        load_state_dict(sd, source="x.safetensors")


def test_nan_in_a_loha_factor_is_refused_naming_the_key():
    sd, name, *_ = loha()
    sd[f"{name}.hada_w1_b"][0, 0] = float("nan")
    lora = load_state_dict(sd, source="nan.safetensors")
    with pytest.raises(LoraFormatError) as e:
        next(iter(lora)).factors()
    assert e.value.key == f"{name}.hada_w1_b" and "NaN" in str(e.value)


def test_loha_with_dora_scale_is_refused_without_a_base():
    """Read with a base (tests/test_formats_lycoris_base.py); without one, a clear refusal."""
    sd, name, *_ = loha()
    sd[f"{name}.dora_scale"] = torch.ones(24, 1)
    with pytest.raises(UnsupportedFormatError, match="DoRA") as e:
        load_state_dict(sd, source="x.safetensors")
    assert e.value.key == f"{name}.dora_scale" and "base model" in str(e.value)


# ----------------------------------------------------------------------------------------------
# end to end on a real (tiny) SD1.5 in ComfyUI library mode: stock LoraLoader
# ----------------------------------------------------------------------------------------------
def _div(x: int) -> int:
    return next(f for f in (4, 2, 1) if x % f == 0)


def _tiny_lycoris(folder, shapes, targets):
    """A LoHa (attention + flattened 3×3 resnet convs + text encoder) and a LoKr (attention, ff, conv
    with a whole 4-D w2, Tucker-free) over the tiny SD1.5, in fp16 as trainers write them."""
    from comfy_support import tiny_sd15 as t

    g = torch.Generator().manual_seed(7)
    rnd = lambda *s: (torch.randn(*s, generator=g) * 0.3).half()  # noqa: E731
    loha_sd, lokr_sd = {}, {}
    for diff, ckey in t._pick(targets, t._ATTN) + t._pick(targets, t._CONV, resnet_only=True):
        shape = shapes[ckey]
        m, n = shape[0], math.prod(shape[1:])
        base = "lora_unet_" + diff.replace(".", "_")
        loha_sd.update({base + ".hada_w1_a": rnd(m, 2), base + ".hada_w1_b": rnd(2, n),
                        base + ".hada_w2_a": rnd(m, 3), base + ".hada_w2_b": rnd(3, n),
                        base + ".alpha": torch.tensor(2.0).half()})
    for i in range(2):
        for mname in t.TE_ATTN:
            base = f"lora_te_text_model_encoder_layers_{i}_{mname}"
            loha_sd.update({base + ".hada_w1_a": rnd(768, 2), base + ".hada_w1_b": rnd(2, 768),
                            base + ".hada_w2_a": rnd(768, 2), base + ".hada_w2_b": rnd(2, 768)})
    for diff, ckey in t._pick(targets, t._ATTN + t._FF) + t._pick(targets, t._CONV, resnet_only=True):
        shape = shapes[ckey]
        a, b = _div(shape[0]), _div(shape[1])
        base = "lora_unet_" + diff.replace(".", "_")
        lokr_sd[base + ".lokr_w1"] = rnd(a, b)
        if len(shape) == 4:
            lokr_sd[base + ".lokr_w2"] = rnd(shape[0] // a, shape[1] // b, *shape[2:])
        else:
            lokr_sd.update({base + ".lokr_w2_a": rnd(shape[0] // a, 4), base + ".lokr_w2_b": rnd(4, shape[1] // b),
                            base + ".alpha": torch.tensor(4.0).half()})
    paths = {}
    for name, sd in (("tiny_loha", loha_sd), ("tiny_lokr", lokr_sd)):
        p = folder / f"{name}.safetensors"
        save_file(sd, str(p))
        paths[name] = p
    return paths


def test_stock_loraloader_on_lycoris_files_equals_merge_output_loaded_by_it(tmp_path, caplog):
    """LoHa + LoKr + kohya LoRA: ComfyUI's LoraLoader chained on the three files patches the same
    weights (rel. err < 1e-5 on every update) as our 'ta' merge written to one kohya file and loaded
    by the same stock LoraLoader — which loads it with zero skipped keys."""
    import logging

    from comfy_support import library
    from comfy_support import tiny_sd15 as t
    import nodes as comfy_nodes

    dirs = library.setup_folders(tmp_path)
    loras = library.tiny_loras(dirs["loras"])
    paths = _tiny_lycoris(dirs["loras"], t._meta_shapes(), t._unet_targets())
    model, clip, _ = library.load_checkpoint()
    strengths = [("tiny_loha", 0.8), ("tiny_lokr", -0.6), ("tiny_kohya_a", 0.5)]
    files = [str(paths.get(n) or loras[n]) for n, _ in strengths]
    res = merge(files, "ta", weights=[s for _, s in strengths], device="cpu", compute_dtype=torch.float64)
    out = dirs["loras"] / "merged.safetensors"
    res.save(str(out), format="kohya", dtype=torch.float32)

    import folder_paths
    folder_paths.filename_list_cache.clear()
    loader = comfy_nodes.LoraLoader()
    with caplog.at_level(logging.WARNING):
        m_ref, c_ref = model, clip
        for n, s in strengths:
            m_ref, c_ref = loader.load_lora(m_ref, c_ref, f"{n}.safetensors", s, s)
        assert "lora key not loaded" not in caplog.text and "ERROR" not in caplog.text
        m_got, c_got = loader.load_lora(model, clip, "merged.safetensors", 1.0, 1.0)
    assert "lora key not loaded" not in caplog.text and "NOT LOADED" not in caplog.text
    assert set(m_got.patches) == set(m_ref.patches) and len(m_ref.patches) > 0
    assert set(c_got.patcher.patches) == set(c_ref.patcher.patches) and len(c_ref.patcher.patches) == 72
    worst = 0.0
    for got_p, ref_p, base_p in ((m_got, m_ref, model), (c_got.patcher, c_ref.patcher, clip.patcher)):
        for key in ref_p.patches:
            base = library.patched_weight(base_p, key)
            d_got = library.patched_weight(got_p, key) - base
            d_ref = library.patched_weight(ref_p, key) - base
            worst = max(worst, rel(d_got, d_ref))
    print(f"LoHa+LoKr+LoRA vs stock LoraLoader chain: worst rel err {worst:.2e}")
    assert worst < 1e-5, worst


def test_one_dimensional_diff_is_refused_naming_the_key():
    sd = {f"{LIN}.diff": _g(24), f"{CONV}.lora_down.weight": _g(2, 8, 3, 3), f"{CONV}.lora_up.weight": _g(16, 2, 1, 1)}
    with pytest.raises(LoraFormatError) as e:
        load_state_dict(sd, source="full.safetensors")
    assert e.value.key == f"{LIN}.diff" and e.value.file == "full.safetensors" and "norm or bias" in str(e.value)


# ----------------------------------------------------------------------------------------------
# DoRA with a base weight
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["linear_in_axis", "linear_out_axis", "conv_in_axis"])
def test_dora_with_base_equals_comfyui_weight_decompose(case):
    conv = case.startswith("conv")
    name = CONV if conv else LIN
    m, c = (16, 8) if conv else (24, 40)
    kk = (3, 3) if conv else ()
    shape = (m, c, *kk)
    r = 3
    sd = {f"{name}.lora_down.weight": _g(r, c, *kk), f"{name}.lora_up.weight": _g(m, r, *((1, 1) if conv else ())),
          f"{name}.alpha": torch.tensor(2.0)}
    sd[f"{name}.dora_scale"] = (_g(m, 1).abs() + 0.5) if case.endswith("out_axis") else \
        (_g(1, c, *((1, 1) if conv else ())).abs() + 0.5)
    W = _g(*shape, dtype=torch.float64)          # ComfyUI computes in the weight dtype: float64 here
    with pytest.raises(UnsupportedFormatError, match="DoRA"):          # no base: the refusal stays
        load_state_dict(sd, source="dora.safetensors")
    seen = []
    lora = load_state_dict(sd, source="dora.safetensors", base=lambda key, src: seen.append((key, src)) or W)
    mod = next(iter(lora))
    assert mod.rank == min(m, c * (9 if conv else 1)) and mod.weight_shape == shape
    ours = mod.delta(torch.float64).reshape(shape)
    assert seen == [(CONV_KEY if conv else LIN_KEY, name)]
    patches = comfy.lora.load_lora(sd, {name: name + ".weight"}, log_missing=False)
    theirs = comfy.lora.calculate_weight([(1.0, patches[name + ".weight"], 1.0, None, None)], W.clone(), name,
                                         intermediate_dtype=torch.float64) - W
    assert theirs.abs().max() > 0
    assert rel(ours, theirs) < 1e-12, case
    # ComfyUI's strength is linear in the decomposed update, as a merge weight is
    half = comfy.lora.calculate_weight([(0.5, patches[name + ".weight"], 1.0, None, None)], W.clone(), name,
                                       intermediate_dtype=torch.float64) - W
    assert rel(0.5 * ours, half) < 1e-12


def test_dora_without_its_base_weight_names_the_key():
    sd = {f"{LIN}.lora_down.weight": _g(2, 40), f"{LIN}.lora_up.weight": _g(24, 2), f"{LIN}.dora_scale": _g(1, 40)}
    lora = load_state_dict(sd, source="d.safetensors", base=lambda key, src: None)
    with pytest.raises(LoraFormatError) as e:
        next(iter(lora)).factors()
    assert e.value.key == f"{LIN}.dora_scale" and "base weight" in str(e.value)


def test_cli_base_checkpoint_feeds_dora(tmp_path):
    """``domerge merge --base ckpt`` reads DoRA inputs against an SGM checkpoint's weights."""
    from domerge_core.cli import main

    name = "lora_unet_input_blocks_4_1_proj_in"          # SGM kohya name -> unet.down_blocks.1.attentions.0.proj_in
    m, n = 24, 40
    sd = {f"{name}.lora_down.weight": _g(2, n), f"{name}.lora_up.weight": _g(m, 2), f"{name}.alpha": torch.tensor(1.0),
          f"{name}.dora_scale": _g(1, n).abs() + 0.5}
    W = _g(m, n)
    save_file(sd, str(tmp_path / "dora.safetensors"))
    save_file({"model.diffusion_model.input_blocks.4.1.proj_in.weight": W,
               "model.diffusion_model.input_blocks.4.1.proj_in.bias": _g(m)}, str(tmp_path / "ckpt.safetensors"))
    out = tmp_path / "out.safetensors"
    assert main(["merge", str(tmp_path / "dora.safetensors"), "-o", str(out), "--method", "ta",
                 "--weights", "0.5", "-q"]) == 2                                   # refused without --base
    assert main(["merge", str(tmp_path / "dora.safetensors"), "-o", str(out), "--method", "ta", "--weights", "0.5",
                 "--base", str(tmp_path / "ckpt.safetensors"), "--dtype", "fp32", "-q"]) == 0
    patches = comfy.lora.load_lora(sd, {name: name + ".weight"}, log_missing=False)
    want = comfy.lora.calculate_weight([(0.5, patches[name + ".weight"], 1.0, None, None)], W.double().clone(), name,
                                       intermediate_dtype=torch.float64) - W.double()
    got = load_lora(str(out))["unet.down_blocks.1.attentions.0.proj_in"].delta(torch.float64)
    assert rel(got, want) < 1e-5


def test_merge_node_reads_dora_against_the_connected_model(tmp_path, caplog):
    """A DoRA LoRA on the tiny SD1.5: the merge node with MODEL/CLIP connected ('ta', full rank) then
    applied at 1/1 patches what stock LoraLoader patches from the DoRA file at the same strength."""
    import logging

    from comfy_support import library
    from comfy_support import tiny_sd15 as t
    import domerge_nodes
    import folder_paths
    import nodes as comfy_nodes

    dirs = library.setup_folders(tmp_path)
    shapes, targets = t._meta_shapes(), t._unet_targets()
    g = torch.Generator().manual_seed(3)
    sd = {}
    for diff_path, ckey in t._pick(targets, t._ATTN)[:6]:
        m, n = shapes[ckey]
        base = "lora_unet_" + diff_path.replace(".", "_")
        sd[base + ".lora_down.weight"] = torch.randn(4, n, generator=g) / n ** 0.5
        sd[base + ".lora_up.weight"] = torch.randn(m, 4, generator=g) * 0.3
        sd[base + ".alpha"] = torch.tensor(4.0)
        sd[base + ".dora_scale"] = torch.rand(1, n, generator=g) + 0.5
    save_file(sd, str(dirs["loras"] / "dora.safetensors"))
    folder_paths.filename_list_cache.clear()
    model, clip, _ = library.load_checkpoint()
    (loras,) = domerge_nodes.NODE_CLASS_MAPPINGS["DomergeLoraList"]().build("dora.safetensors", 0.8)
    node = domerge_nodes.NODE_CLASS_MAPPINGS["DomergeMergeLoras"]()
    widgets = {k: v[1]["default"] for k, v in node.INPUT_TYPES()["required"].items()
               if k not in ("loras", "method") and isinstance(v[1], dict) and "default" in v[1]}
    merged, text = node.merge(loras, "ta", model=model, clip=clip, **widgets)
    m1, _ = domerge_nodes.NODE_CLASS_MAPPINGS["DomergeApplyLora"]().apply(model, clip, merged, 1.0, 1.0)
    with caplog.at_level(logging.WARNING):
        m2, _ = comfy_nodes.LoraLoader().load_lora(model, clip, "dora.safetensors", 0.8, 0.8)
    assert "lora key not loaded" not in caplog.text
    assert set(m1.patches) == set(m2.patches) and len(m2.patches) == 6
    worst = 0.0
    for key in m2.patches:
        b = library.patched_weight(model, key)
        d1, d2 = library.patched_weight(m1, key) - b, library.patched_weight(m2, key) - b
        worst = max(worst, rel(d1, d2))
    print(f"DoRA via node vs stock LoraLoader: worst rel err {worst:.2e}")
    assert worst < 1e-5


def test_inspect_names_the_adapter_types(tmp_path):
    from domerge_core import describe

    sd, *_ = loha()
    sd.update(lokr(name=CONV, conv=(3, 3), c=4, d=2)[0])
    p = tmp_path / "mixed.safetensors"
    save_file(sd, str(p))
    d = describe(str(p))                      # header only
    assert d["adapters"] == {"loha": 1, "lokr": 1} and d["modules"] == 2
    sd3 = {f"{LIN}.lora_down.weight": _g(2, 40), f"{LIN}.lora_up.weight": _g(24, 2)}
    save_file(sd3, str(tmp_path / "plain.safetensors"))
    assert "adapters" not in describe(str(tmp_path / "plain.safetensors"))


@pytest.mark.parametrize("case", ["linear", "linear_constrained", "conv"])
def test_oft_with_base_equals_comfyui(case):
    """LyCORIS OFT (``oft_blocks``): with the base weight, the dense update ComfyUI's OFT adapter
    patches at strength 1; refused without a base."""
    conv = case == "conv"
    name = CONV if conv else LIN
    k, b = 4, 4
    shape = (k * b, 8, 3, 3) if conv else (k * b, 20)
    sd = {f"{name}.oft_blocks": _g(k, b, b) * 0.1}
    if case == "linear_constrained":
        sd[f"{name}.alpha"] = torch.tensor(0.05)
    else:
        sd[f"{name}.alpha"] = torch.tensor(0.0)
    W = _g(*shape)           # float32: ComfyUI's OFT fails ("expected Double") with a float64 weight
    with pytest.raises(UnsupportedFormatError, match="OFT"):
        load_state_dict(sd, source="oft.safetensors")
    lora = load_state_dict(sd, source="oft.safetensors", base=lambda key, src: W)
    mod = next(iter(lora))
    assert mod.weight_shape == shape
    ours = mod.delta(torch.float64).reshape(shape)
    patches = comfy.lora.load_lora(sd, {name: name + ".weight"}, log_missing=False)
    theirs = (comfy.lora.calculate_weight([(1.0, patches[name + ".weight"], 1.0, None, None)], W.clone(), name,
                                          intermediate_dtype=torch.float32) - W).double()
    assert theirs.abs().max() > 0
    assert rel(ours, theirs) < 1e-5, case        # ComfyUI works in float32
