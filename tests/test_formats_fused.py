"""Flux in one canonical key space, including the modules outside the blocks, and base-dependent
LyCORIS adapters (OFT / BOFT / GLoRA) on fused modules — against real ComfyUI 0.3.75 and diffusers.

A tiny Flux (hidden 32, one double and one single block, guidance embedder) is built by ComfyUI's
``supported_models.Flux``; ``comfy.lora.model_lora_keys_unet`` is the key map and
``comfy.utils.flux_to_diffusers`` the diffusers path -> (weight, slice, swap_scale_shift) table. Every
module of the BFL layouts (sd-scripts ``lora_unet_``, ComfyUI ``diffusion_model.``) and the diffusers
layouts (``transformer.``, OneTrainer ``lora_transformer_``, SimpleTuner ``lycoris_``) lands on the
weight rows ComfyUI patches, in ComfyUI's order (``final_layer.adaLN_modulation.1`` <->
``norm_out.linear``: halves swapped). A kohya + diffusers merge lines up module by module, equals the
dense float64 sum, and its diffusers file loads into ComfyUI (no key left out, same patches) and into
diffusers' ``FluxTransformer2DModel`` (every module, ΔW incl. the swapped ``norm_out.linear``).
"""
from __future__ import annotations

import dataclasses
import logging
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from comfy_support import runtime

torch.set_num_threads(1)
runtime.import_comfy_library()

import comfy.lora  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.supported_models  # noqa: E402
import comfy.utils  # noqa: E402

import domerge_core  # noqa: E402
from domerge_core.formats.base import base_weights  # noqa: E402
from domerge_core.formats.canonical import file_hint  # noqa: E402
from domerge_core.formats.names import map_name  # noqa: E402
from test_formats_sd3 import _comfy_delta, _file, _rel, assert_lands_where_comfyui_puts_it, model_rows  # noqa: E402

H = 32
FLUX_CFG = dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=32,
                hidden_size=H, mlp_ratio=4.0, num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[4, 4, 8],
                theta=10000, qkv_bias=True, guidance_embed=True, patch_size=2)


def _cfg():
    import comfy.ldm.flux.model
    cfg = dict(FLUX_CFG)
    if "txt_ids_dims" in {f.name for f in dataclasses.fields(comfy.ldm.flux.model.FluxParams)}:
        cfg["txt_ids_dims"] = []
    return cfg


def _model(device="meta"):
    return comfy.supported_models.Flux(_cfg()).get_model({}, "", device=device)


@pytest.fixture(scope="module")
def flux():
    model = _model()
    key_map = comfy.lora.model_lora_keys_unet(model, {})
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    d2c = comfy.utils.flux_to_diffusers(_cfg(), output_prefix="diffusion_model.")
    return key_map, shapes, d2c


def _native_modules(shapes):
    return [(k[len("diffusion_model."):-len(".weight")], s) for k, s in shapes.items()
            if k.startswith("diffusion_model.") and k.endswith(".weight") and len(s) == 2]


def _diffusers_modules(shapes, d2c):
    out = []
    for k, t in d2c.items():
        w = t if isinstance(t, str) else t[0]
        if k.endswith(".weight") and w in shapes and len(shapes[w]) == 2:
            _, rows = model_rows(t, shapes)
            out.append((k[: -len(".weight")], (len(rows), shapes[w][1])))
    return out


LAYOUTS = {  # name -> (module name from path, family, native paths?)
    "comfy": (lambda p: f"diffusion_model.{p}", "down_up", True),
    "kohya": (lambda p: "lora_unet_" + p.replace(".", "_"), "down_up", True),
    "diffusers": (lambda p: f"transformer.{p}", "ab", False),
    "onetrainer": (lambda p: "lora_transformer_" + p.replace(".", "_"), "down_up", False),
    "lycoris": (lambda p: "lycoris_" + p.replace(".", "_"), "down_up", False),
}
TOP = {"img_in", "txt_in", "time_in.in_layer", "time_in.out_layer", "vector_in.in_layer", "vector_in.out_layer",
       "guidance_in.in_layer", "guidance_in.out_layer", "final_layer.linear", "final_layer.adaLN_modulation.1"}


def _modules(layout, shapes, d2c):
    namer, family, native = LAYOUTS[layout]
    mods = _native_modules(shapes) if native else _diffusers_modules(shapes, d2c)
    return [(namer(p), s) for p, s in mods], family


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_flux_module_name_lands_where_comfyui_puts_it(flux, layout):
    """Row by row and in order: fused qkv / linear1 split, the modules outside the blocks on their
    diffusers names, ``final_layer.adaLN_modulation.1`` as ``norm_out.linear`` with swapped halves."""
    key_map, shapes, d2c = flux
    mods, family = _modules(layout, shapes, d2c)
    hint = file_hint(n for n, _ in mods)
    assert hint == ("flux" if LAYOUTS[layout][2] else None)

    def truth(key):
        comp, path = key.split(".", 1)
        return model_rows(d2c[path + ".weight"] if comp == "transformer" else key + ".weight", shapes)

    counts = [assert_lands_where_comfyui_puts_it(n, family, s, key_map, shapes, truth, hint) for n, s in mods]
    assert len(mods) >= 23 and counts.count(3) == (2 if LAYOUTS[layout][2] else 0)
    if LAYOUTS[layout][2]:
        assert counts.count(4) == 1                                   # linear1: q, k, v, mlp
        assert TOP <= {p for p, _ in _native_modules(shapes)}
        keys = {k for n, s in mods for k, _ in map_name(n, family, s[0], s[1], hint).targets}
        assert not [k for k in keys if not k.startswith("transformer.")], keys
        m = map_name(LAYOUTS[layout][0]("final_layer.adaLN_modulation.1"), family, 2 * H, H, hint)
        assert m.targets == [("transformer.norm_out.linear", ((H, 2 * H), (0, H)))]


def test_flux_top_modules_keep_their_names_outside_a_flux_file():
    """Without Flux blocks or embedders in the file, ``img_in`` / ``txt_in`` / ``final_layer.…`` are
    other models' names (Qwen-Image's diffusers ``img_in``, Lumina's ``final_layer``): left alone."""
    for name in ("lora_unet_img_in", "diffusion_model.txt_in", "transformer.img_in",
                 "lora_unet_final_layer_adaLN_modulation_1"):
        m = map_name(name, "down_up", 2 * H, H, file_hint([name]))
        assert len(m.targets) == 1 and m.targets[0][1] is None
        assert not m.targets[0][0].startswith(("transformer.x_embedder", "transformer.context_embedder",
                                               "transformer.norm_out")), m.targets
    hint = file_hint(["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight", "lora_unet_img_in"])
    assert hint == "flux"
    assert map_name("lora_unet_img_in", "down_up", H, 64, hint).targets == [("transformer.x_embedder", None)]
    # SD3's final modulation is swapped as well; a final layer of another shape (Lumina: out = in) is not
    assert map_name("lora_unet_final_layer_adaLN_modulation_1", "down_up", 2 * H, H, "sd3").targets == \
        [("transformer.norm_out.linear", ((H, 2 * H), (0, H)))]
    assert map_name("lora_unet_final_layer_adaLN_modulation_1", "down_up", H, H, "flux").targets[0][1] is None


def _tiny_diffusers_flux():
    from diffusers import FluxTransformer2DModel
    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                  pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 4, 8))


def test_flux_kohya_with_top_modules_and_diffusers_merge_lines_up_and_loads_everywhere(flux, tmp_path, caplog):
    """A kohya Flux LoRA over every module (img_in, txt_in, time_in, vector_in, guidance_in, final_layer
    too) merged with a diffusers Flux LoRA: the same canonical modules, ΔW = the dense float64 sum;
    the diffusers file loads into ComfyUI (every key mapped, same patches as the two inputs) and into
    diffusers' FluxTransformer2DModel (every module, our ΔW; norm_out.linear = the kohya final
    modulation with its halves swapped + the diffusers one)."""
    pytest.importorskip("peft")
    from diffusers import FluxPipeline
    from peft.tuners.lora import LoraLayer

    key_map, shapes, d2c = flux
    mods_k, fam_k = _modules("kohya", shapes, d2c)
    mods_d, fam_d = _modules("diffusers", shapes, d2c)
    fk = _file(tmp_path / "k.safetensors", mods_k, fam_k, seed=1)
    fd = _file(tmp_path / "d.safetensors", mods_d, fam_d, seed=2)
    k, d = domerge_core.load_lora(str(fk)), domerge_core.load_lora(str(fd))
    assert set(k.modules) == set(d.modules) and len(k) == len(mods_d) >= 28
    assert k.base_model == d.base_model == "flux"
    wk, wd = 0.8, -1.1
    res = domerge_core.merge([k, d], "ta", weights=[wk, wd])
    assert set(res.lora.modules) == set(k.modules)
    worst = max(_rel(m.delta(torch.float64), wk * k[key].delta(torch.float64) + wd * d[key].delta(torch.float64))
                for key, m in res.lora.modules.items())
    print("merge vs dense float64 sum:", worst)
    assert worst < 1e-6, worst                      # fp32 factors of the inputs: ~4e-8
    assert domerge_core.check_loadable(res.lora, None) == "diffusers"
    out = res.save(str(tmp_path / "m.safetensors"), dtype=torch.float64)
    # ComfyUI: every key mapped, the same patches as the inputs at their weights
    got = _comfy_delta([(load_file(out), 1.0)], key_map, shapes, caplog)
    want = _comfy_delta([(load_file(str(fk)), wk), (load_file(str(fd)), wd)], key_map, shapes, caplog)
    assert set(got) == set(want) and len(want) >= 23
    errs = {key: _rel(got[key], want[key]) for key in want}
    print("ComfyUI patches, merged file vs inputs:", max(errs.values()))
    assert max(errs.values()) < 1e-6, max(errs.items(), key=lambda kv: kv[1])
    # diffusers: every module loads, each with the merged ΔW
    state = FluxPipeline.lora_state_dict(out)
    state = state[0] if isinstance(state, tuple) else state
    tr = _tiny_diffusers_flux()
    tr.load_lora_adapter(state, prefix="transformer", adapter_name="x")
    layers = {n: m for n, m in tr.named_modules() if isinstance(m, LoraLayer)}
    assert {"transformer." + n for n in layers} == set(res.lora.modules)
    assert {"x_embedder", "context_embedder", "norm_out.linear", "proj_out",
            "time_text_embed.guidance_embedder.linear_2"} <= set(layers)
    errs = {n: _rel(m.get_delta_weight("x").detach().double(), res.lora["transformer." + n].delta(torch.float64))
            for n, m in layers.items()}
    print("diffusers get_delta_weight vs merged:", max(errs.values()), "norm_out.linear:", errs["norm_out.linear"],
          "x_embedder:", errs["x_embedder"])
    assert max(errs.values()) < 1e-6, max(errs.items(), key=lambda kv: kv[1])
    # norm_out.linear from the raw tensors: kohya's final modulation (shift, scale) swapped + diffusers'
    raw_k, raw_d = load_file(str(fk)), load_file(str(fd))
    nk = "lora_unet_final_layer_adaLN_modulation_1"
    dk = raw_k[nk + ".lora_up.weight"].double() @ raw_k[nk + ".lora_down.weight"].double() * (2.0 / 4)
    dd = raw_d["transformer.norm_out.linear.lora_B.weight"].double() @ \
        raw_d["transformer.norm_out.linear.lora_A.weight"].double()
    want_norm = wk * torch.cat([dk[H:], dk[:H]]) + wd * dd
    assert _rel(layers["norm_out.linear"].get_delta_weight("x").detach().double(), want_norm) < 1e-6
    # x_embedder = kohya img_in + diffusers x_embedder
    dk = raw_k["lora_unet_img_in.lora_up.weight"].double() @ raw_k["lora_unet_img_in.lora_down.weight"].double() / 2
    dd = raw_d["transformer.x_embedder.lora_B.weight"].double() @ raw_d["transformer.x_embedder.lora_A.weight"].double()
    assert _rel(layers["x_embedder"].get_delta_weight("x").detach().double(), wk * dk + wd * dd) < 1e-6


def test_key_aligner_puts_the_swapped_final_modulation_on_one_key(flux, tmp_path):
    """The merge node's key aligner (ComfyUI's key map over a connected MODEL): kohya's
    ``final_layer.adaLN_modulation.1`` and diffusers' ``norm_out.linear`` patch one weight (ComfyUI:
    the diffusers one through swap_scale_shift) and share one key; nothing is left unmatched."""
    from domerge_nodes import comfy_glue

    _, shapes, d2c = flux
    patcher = comfy.model_patcher.ModelPatcher(_model(), load_device=torch.device("cpu"),
                                               offload_device=torch.device("cpu"))
    mods_k, fam_k = _modules("kohya", shapes, d2c)
    mods_d, fam_d = _modules("diffusers", shapes, d2c)
    k = domerge_core.load_lora(str(_file(tmp_path / "k.safetensors", mods_k, fam_k)))
    d = domerge_core.load_lora(str(_file(tmp_path / "d.safetensors", mods_d, fam_d)))
    aligner = comfy_glue.KeyAligner(patcher, None)
    a, b = aligner.align(k), aligner.align(d)
    assert not aligner.unmatched and set(a.modules) == set(b.modules) and len(a) == len(k)
    assert {"transformer.norm_out.linear", "transformer.x_embedder"} <= set(a.modules)


# ---------------------------------------------------------------------------------------------
# OFT / BOFT / GLoRA on fused modules: the update of the fused base weight, split by rows
# ---------------------------------------------------------------------------------------------
def _g(*shape, seed=[100]):
    seed[0] += 1
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed[0]))


def _comfy_patch(sd, name, W):
    """ComfyUI's ΔW of ``W`` for the file module ``name`` at strength 1 (its OFT works in float32)."""
    patches = comfy.lora.load_lora({k: v for k, v in sd.items() if k.startswith(name + ".")},
                                   {name: name + ".weight"}, log_missing=False)
    W = W.float()
    return (comfy.lora.calculate_weight([(1.0, patches[name + ".weight"], 1.0, None, None)], W.clone(), name,
                                        intermediate_dtype=torch.float32) - W).double()


def _adapters():
    """kohya-named LyCORIS modules on fused / swapped Flux weights: (name, native path, tensors, targets)."""
    b = 8
    oft = {"oft_blocks": _g(3 * H // b, b, b) * 0.1, "alpha": torch.tensor(0.0)}
    boft = {"oft_blocks": _g(2, 3 * H // b, b, b) * 0.1, "alpha": torch.tensor(0.5)}
    r = 3
    glora_l1 = {"a1.weight": _g(H, r) * 0.3, "a2.weight": _g(r, H) * 0.3, "b1.weight": _g(7 * H, r) * 0.3,
                "b2.weight": _g(r, H) * 0.3, "alpha": torch.tensor(1.0)}
    glora_fin = {"a1.weight": _g(H, r) * 0.3, "a2.weight": _g(r, H) * 0.3, "b1.weight": _g(2 * H, r) * 0.3,
                 "b2.weight": _g(r, H) * 0.3, "alpha": torch.tensor(2.0)}
    dt = "transformer.transformer_blocks.0."
    st = "transformer.single_transformer_blocks.0."
    return [
        ("lora_unet_double_blocks_0_img_attn_qkv", "double_blocks.0.img_attn.qkv", oft,
         [dt + "attn.to_q", dt + "attn.to_k", dt + "attn.to_v"], None),
        ("lora_unet_double_blocks_0_txt_attn_qkv", "double_blocks.0.txt_attn.qkv", boft,
         [dt + "attn.add_q_proj", dt + "attn.add_k_proj", dt + "attn.add_v_proj"], None),
        ("lora_unet_single_blocks_0_linear1", "single_blocks.0.linear1", glora_l1,
         [st + "attn.to_q", st + "attn.to_k", st + "attn.to_v", st + "proj_mlp"], None),
        ("lora_unet_final_layer_adaLN_modulation_1", "final_layer.adaLN_modulation.1", glora_fin,
         ["transformer.norm_out.linear"], "swap"),
    ]


def _lyco_file(adapters):
    return {f"{name}.{role}": t for name, _, ts, _, _ in adapters for role, t in ts.items()}


def _check(lora, adapters, weights, direct=True):
    errs = {}
    sd = _lyco_file(adapters)
    for name, path, _, targets, swap in adapters:
        W = weights[path]
        want = _comfy_patch(sd, name, W)
        got = torch.cat([lora[t].delta(torch.float64) for t in targets])
        if swap:                                      # ours is in diffusers' order: scale, shift
            got = torch.cat([got[H:], got[:H]])
        assert not direct or [lora[t].source_name for t in targets] == [name] * len(targets)
        errs[name] = _rel(got, want)
    return errs


def test_oft_boft_glora_on_fused_flux_modules_match_comfyui_with_a_checkpoint_base(tmp_path):
    """``--base`` checkpoint (BFL names): OFT on img qkv, BOFT on txt qkv, GLoRA on linear1 and on the
    final modulation (norm_out.linear, rows swapped): the parts stacked back = ComfyUI's patch of the
    fused weight; the update is computed once per fused module."""
    paths = {"double_blocks.0.img_attn.qkv": (3 * H, H), "double_blocks.0.txt_attn.qkv": (3 * H, H),
             "single_blocks.0.linear1": (7 * H, H), "final_layer.adaLN_modulation.1": (2 * H, H),
             "img_in": (H, 64)}
    weights = {p: _g(*s) * 0.2 for p, s in paths.items()}
    save_file({f"model.diffusion_model.{p}.weight": w for p, w in weights.items()}, str(tmp_path / "ckpt.safetensors"))
    adapters = _adapters()
    save_file(_lyco_file(adapters), str(tmp_path / "lyco.safetensors"))
    fn = base_weights(str(tmp_path / "ckpt.safetensors"))
    assert fn.shape("transformer.norm_out.linear") == (2 * H, H)
    assert torch.equal(fn("transformer.norm_out.linear"), torch.cat([weights["final_layer.adaLN_modulation.1"][H:],
                                                                      weights["final_layer.adaLN_modulation.1"][:H]]))
    calls = []

    def base(key, name):
        calls.append(key)
        return fn(key, name)
    base.shape = fn.shape
    lora = domerge_core.load_lora(str(tmp_path / "lyco.safetensors"), base=base)
    assert len(lora) == 3 + 3 + 4 + 1
    errs = _check(lora, adapters, weights)
    print("checkpoint base, vs ComfyUI:", errs)
    assert max(errs.values()) < 1e-5, errs
    assert len(calls) == len(lora)           # each part's base read once: one fused update per module
    # the CLI merge with --base writes it (diffusers layout) with the same updates
    out = tmp_path / "out.safetensors"
    from domerge_core.cli import main
    assert main(["merge", str(tmp_path / "lyco.safetensors"), "-o", str(out), "--method", "ta",
                                  "--base", str(tmp_path / "ckpt.safetensors"), "--dtype", "fp32", "-q"]) == 0
    merged = domerge_core.load_lora(str(out))
    errs = _check(merged, adapters, weights, direct=False)
    assert max(errs.values()) < 1e-5, errs


def test_oft_and_glora_on_fused_flux_modules_against_the_connected_model_in_comfyui():
    """The merge node's base lookup (ComfyUI's key maps over a connected MODEL, a norm_out.linear base
    swapped back as ComfyUI's swap_scale_shift does) feeds the same fused updates."""
    from domerge_nodes import comfy_glue

    model = _model("cpu")
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"),
                                               offload_device=torch.device("cpu"))
    sdm = model.state_dict()
    adapters = _adapters()
    weights = {path: sdm[f"diffusion_model.{path}.weight"].detach().float() for _, path, _, _, _ in adapters}
    lora = domerge_core.load_state_dict(_lyco_file(adapters), source="lyco_fused",
                                        base=comfy_glue.base_weight_fn(model=patcher))
    errs = _check(lora, adapters, weights)
    print("connected model base, vs ComfyUI:", errs)
    assert max(errs.values()) < 1e-5, errs


def test_fused_glora_with_a_missing_base_part_names_file_and_key(tmp_path):
    save_file({"model.diffusion_model.double_blocks.0.txt_attn.qkv.weight": _g(3 * H, H)},
              str(tmp_path / "ckpt.safetensors"))
    name, _, ts, _, _ = _adapters()[2]
    save_file({f"{name}.{r}": t for r, t in ts.items()}, str(tmp_path / "g.safetensors"))
    with pytest.raises(domerge_core.LoraFormatError) as e:
        domerge_core.load_lora(str(tmp_path / "g.safetensors"), base=base_weights(str(tmp_path / "ckpt.safetensors")))
    assert "base weight" in str(e.value) and "g.safetensors" in str(e.value) and e.value.key == f"{name}.a1.weight"


# ---------------------------------------------------------------------------------------------
# base model guess and inspect
# ---------------------------------------------------------------------------------------------
def test_diffusers_only_sd3_file_is_recognised_as_sd3(tmp_path):
    """SD3 diffusers names (joint blocks, no Flux single blocks, 64 hidden per block) -> "sd3"; a
    Flux double-block-only diffusers file is not SD3."""
    from test_formats_sd3 import SD3_CFG, _diffusers_modules
    model = comfy.supported_models.SD3(dict(SD3_CFG)).get_model({}, "", device="meta")
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    d2c = comfy.utils.mmdit_to_diffusers(dict(SD3_CFG), output_prefix="diffusion_model.")
    mods = [(f"transformer.{p}", (s[0], math.prod(s[1:]))) for p, s in _diffusers_modules(shapes, d2c)
            if "attn2" not in p and "pos_embed" not in p]               # SD3 (not 3.5-medium) evidence only
    lora = domerge_core.load_lora(str(_file(tmp_path / "sd3.safetensors", mods, "ab")))
    assert lora.base_model == "sd3"
    assert domerge_core.describe(str(tmp_path / "sd3.safetensors"))["base_model"] == "sd3"
    flux_double = [(n, s) for n, s in _diffusers_modules({k: v for k, v in flux_shapes().items()},
                                                         comfy.utils.flux_to_diffusers(_cfg(), "diffusion_model."))
                   if n.startswith("transformer_blocks.")]
    lora = domerge_core.load_lora(str(_file(tmp_path / "fd.safetensors", [("transformer." + n, s) for n, s in flux_double],
                                            "ab")))
    assert lora.base_model != "sd3"


def flux_shapes():
    return {k: tuple(v.shape) for k, v in _model().state_dict().items()}


def test_inspect_shows_the_files_alphas(tmp_path):
    """inspect's alphas are the file's own values: GLoRA alpha 1 with r 3 is "1" (not scale × rank = 2·1/3·3
    … of its exact rank 2r), a kohya LoRA's alpha as written, a diffusers LoRA's implied alpha (scale × rank)."""
    from domerge_core.formats.describe import describe, format_description
    W = _g(24, 40)
    save_file({"x.weight": W}, str(tmp_path / "base.safetensors"))
    name = "lora_unet_down_blocks_0_attentions_0_proj_in"
    sd = {f"{name}.a1.weight": _g(40, 3), f"{name}.a2.weight": _g(3, 40), f"{name}.b1.weight": _g(24, 3),
          f"{name}.b2.weight": _g(3, 40), f"{name}.alpha": torch.tensor(1.0),
          "lora_unet_down_blocks_0_attentions_0_proj_out.lora_down.weight": _g(4, 24),
          "lora_unet_down_blocks_0_attentions_0_proj_out.lora_up.weight": _g(40, 4),
          "lora_unet_down_blocks_0_attentions_0_proj_out.alpha": torch.tensor(2.5)}
    save_file(sd, str(tmp_path / "g.safetensors"))

    def base(key, _name):
        return W if key.endswith("proj_in") else None
    d = describe(str(tmp_path / "g.safetensors"), base=base)
    assert d["alphas"] == {"1": 1, "2.5": 1}, d["alphas"]
    assert "alphas      {'1': 1, '2.5': 1}" in format_description(d)
    sd = {"transformer.x_embedder.lora_A.weight": _g(4, 40), "transformer.x_embedder.lora_B.weight": _g(24, 4)}
    save_file(sd, str(tmp_path / "d.safetensors"), metadata={"lora_adapter_metadata": '{"r": 4, "lora_alpha": 8}'})
    assert describe(str(tmp_path / "d.safetensors"))["alphas"] == {"8": 1}
