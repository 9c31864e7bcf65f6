"""``--base``: a checkpoint's weights by canonical key, for DoRA inputs, where the checkpoint stores them
fused or under other names — SDXL's OpenCLIP text encoder (``attn.in_proj_weight``), BFL Flux and SD3
fused qkv / ``linear1`` (full checkpoints, ComfyUI-native and transformer-only files) — and DoRA on a
fused module, decomposed whole as ComfyUI does. References: ComfyUI's own converters
(``clip_text_transformers_convert``) and ``weight_decompose`` (``comfy.lora.load_lora`` +
``calculate_weight``) on real safetensors files written here with tiny shapes."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from comfy_support import runtime

torch.set_num_threads(1)
runtime.import_comfy_library()

import comfy.lora  # noqa: E402
import comfy.utils  # noqa: E402

from domerge_core import LoraFormatError, load_lora  # noqa: E402
from domerge_core.cli import main  # noqa: E402
from domerge_core.formats.base import base_weights  # noqa: E402


def _g(*shape, seed=[0]):
    seed[0] += 1
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed[0]))


def rel(a, b):
    return float((a - b).norm() / b.norm())


def _dora(name, m, n, r=4, axis="in"):
    return {f"{name}.lora_down.weight": _g(r, n) / n ** 0.5, f"{name}.lora_up.weight": _g(m, r) * 0.3,
            f"{name}.alpha": torch.tensor(2.0),
            f"{name}.dora_scale": (_g(1, n) if axis == "in" else _g(m, 1)).abs() + 0.5}


def _comfy(sd, name, W, strength=0.5):
    """ComfyUI's patch of ``W`` (its ``weight_decompose`` for DoRA) at ``strength``, float64, minus W."""
    patches = comfy.lora.load_lora({k: v for k, v in sd.items() if k.startswith(name + ".")},
                                   {name: name + ".weight"}, log_missing=False)
    W = W.double()
    return comfy.lora.calculate_weight([(strength, patches[name + ".weight"], 1.0, None, None)], W.clone(), name,
                                       intermediate_dtype=torch.float64) - W


def _merge(tmp_path, sd, ckpt, fmt=None):
    save_file(sd, str(tmp_path / "dora.safetensors"))
    out = tmp_path / "out.safetensors"
    args = ["merge", str(tmp_path / "dora.safetensors"), "-o", str(out), "--method", "ta", "--weights", "0.5",
            "--base", str(ckpt), "--dtype", "fp32", "-q"] + (["--format", fmt] if fmt else [])
    assert main(args) == 0
    return load_lora(str(out))


def test_sdxl_te2_openclip_checkpoint_feeds_dora_like_comfyui(tmp_path):
    """kohya DoRA on SDXL's second text encoder (q/k/v from rows of ``in_proj_weight``, out_proj, fc1,
    fc2) via ``domerge merge --base`` = ComfyUI's weight_decompose on the weights ComfyUI's own
    ``clip_text_transformers_convert`` makes of the checkpoint."""
    d = 40
    pre = "conditioner.embedders.1.model.transformer.resblocks.1."
    ck = {pre + "attn.in_proj_weight": _g(3 * d, d), pre + "attn.in_proj_bias": _g(3 * d),
          pre + "attn.out_proj.weight": _g(d, d), pre + "mlp.c_fc.weight": _g(4 * d, d),
          pre + "mlp.c_proj.weight": _g(d, 4 * d), pre + "ln_1.weight": _g(d),
          "conditioner.embedders.0.transformer.text_model.encoder.layers.1.self_attn.k_proj.weight": _g(24, 24)}
    save_file(ck, str(tmp_path / "ckpt.safetensors"))
    conv = comfy.utils.clip_text_transformers_convert(dict(ck), "conditioner.embedders.1.model.", "te2.")
    mods = {"self_attn_q_proj": "self_attn.q_proj", "self_attn_k_proj": "self_attn.k_proj",
            "self_attn_v_proj": "self_attn.v_proj", "self_attn_out_proj": "self_attn.out_proj",
            "mlp_fc1": "mlp.fc1", "mlp_fc2": "mlp.fc2"}
    sd, want = {}, {}
    for flat, path in mods.items():
        name = f"lora_te2_text_model_encoder_layers_1_{flat}"
        W = conv[f"te2.text_model.encoder.layers.1.{path}.weight"]
        sd.update(_dora(name, *W.shape, axis="out" if flat == "mlp_fc1" else "in"))
        want[f"text_encoder_2.text_model.encoder.layers.1.{path}"] = _comfy(sd, name, W)
    got = _merge(tmp_path, sd, tmp_path / "ckpt.safetensors")
    errs = {k: rel(got[k].delta(torch.float64), w) for k, w in want.items()}
    assert max(errs.values()) < 1e-5, errs
    # the lookup itself: rows of the fused tensor, read one tensor at a time
    fn = base_weights(str(tmp_path / "ckpt.safetensors"))
    k = fn("text_encoder_2.text_model.encoder.layers.1.self_attn.k_proj")
    assert torch.equal(k, ck[pre + "attn.in_proj_weight"][d:2 * d])
    assert fn.shape("text_encoder_2.text_model.encoder.layers.1.self_attn.v_proj") == (d, d)
    assert fn("text_encoder.text_model.encoder.layers.1.self_attn.k_proj") is not None


FLUX_H = 32


def _flux_ckpt(prefix):
    h = FLUX_H
    return {f"{prefix}double_blocks.0.img_attn.qkv.weight": _g(3 * h, h),
            f"{prefix}double_blocks.0.img_attn.qkv.bias": _g(3 * h),
            f"{prefix}double_blocks.0.txt_attn.qkv.weight": _g(3 * h, h),
            f"{prefix}double_blocks.0.img_attn.proj.weight": _g(h, h),
            f"{prefix}double_blocks.0.img_mlp.0.weight": _g(4 * h, h),
            f"{prefix}single_blocks.0.linear1.weight": _g(7 * h, h),
            f"{prefix}single_blocks.0.linear2.weight": _g(h, 5 * h)}


@pytest.mark.parametrize("prefix", ["model.diffusion_model.", "diffusion_model.", ""])
def test_flux_fused_checkpoint_feeds_dora_and_fused_dora_matches_comfyui(tmp_path, prefix):
    """BFL Flux weights (full checkpoint, ComfyUI-native, transformer-only file) feed kohya DoRA modules:
    plain ones (img_attn.proj, img_mlp.0, linear2) and fused ones (img_attn_qkv, txt_attn_qkv, linear1)
    that ComfyUI decomposes on the whole fused weight (column norms over all q/k/v rows; an output-axis
    dora_scale on txt qkv). The split outputs stacked back = ComfyUI's ΔW of the fused weight."""
    ck = _flux_ckpt(prefix)
    save_file(ck, str(tmp_path / "ckpt.safetensors"))
    h = FLUX_H
    mods = {"double_blocks_0_img_attn_qkv": ("double_blocks.0.img_attn.qkv", ["attn.to_q", "attn.to_k", "attn.to_v"]),
            "double_blocks_0_txt_attn_qkv": ("double_blocks.0.txt_attn.qkv",
                                             ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"]),
            "double_blocks_0_img_attn_proj": ("double_blocks.0.img_attn.proj", ["attn.to_out.0"]),
            "double_blocks_0_img_mlp_0": ("double_blocks.0.img_mlp.0", ["ff.net.0.proj"]),
            "single_blocks_0_linear1": ("single_blocks.0.linear1",
                                        ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"]),
            "single_blocks_0_linear2": ("single_blocks.0.linear2", ["proj_out"])}
    sd, want = {}, {}
    for flat, (path, _) in mods.items():
        name = "lora_unet_" + flat
        W = ck[f"{prefix}{path}.weight"]
        sd.update(_dora(name, *W.shape, axis="out" if "txt" in flat else "in"))
        want[flat] = _comfy(sd, name, W)
    got = _merge(tmp_path, sd, tmp_path / "ckpt.safetensors", fmt="diffusers")
    errs = {}
    for flat, (path, targets) in mods.items():
        block = ("transformer.transformer_blocks.0." if flat.startswith("double")
                 else "transformer.single_transformer_blocks.0.")
        parts = [got[block + t].delta(torch.float64) for t in targets]
        assert len(parts) == 1 or all(p.shape[0] == h for p in parts[:3])
        errs[flat] = rel(torch.cat(parts), want[flat])
    assert max(errs.values()) < 1e-5, errs


def test_sd3_native_checkpoint_feeds_fused_dora(tmp_path):
    """SD3 ``joint_blocks`` checkpoint weights: a DoRA on the fused ``x_block.attn.qkv`` (split into
    to_q/k/v) and on ``context_block.mlp.fc1`` = ComfyUI's weight_decompose on those weights."""
    h = 64
    pre = "model.diffusion_model.joint_blocks.0."
    ck = {pre + "x_block.attn.qkv.weight": _g(3 * h, h), pre + "context_block.mlp.fc1.weight": _g(4 * h, h),
          pre + "context_block.attn.qkv.weight": _g(3 * h, h),
          "text_encoders.clip_g.transformer.text_model.encoder.layers.2.mlp.fc1.weight": _g(8, 4),
          "text_encoders.clip_l.transformer.text_model.encoder.layers.2.self_attn.q_proj.weight": _g(4, 4)}
    save_file(ck, str(tmp_path / "ckpt.safetensors"))
    sd = {}
    sd.update(_dora("lora_unet_joint_blocks_0_x_block_attn_qkv", 3 * h, h))
    sd.update(_dora("lora_unet_joint_blocks_0_context_block_mlp_fc1", 4 * h, h))
    want_qkv = _comfy(sd, "lora_unet_joint_blocks_0_x_block_attn_qkv", ck[pre + "x_block.attn.qkv.weight"])
    want_fc1 = _comfy(sd, "lora_unet_joint_blocks_0_context_block_mlp_fc1", ck[pre + "context_block.mlp.fc1.weight"])
    got = _merge(tmp_path, sd, tmp_path / "ckpt.safetensors", fmt="diffusers")
    b = "transformer.transformer_blocks.0."
    e1 = rel(torch.cat([got[b + f"attn.to_{x}"].delta(torch.float64) for x in "qkv"]), want_qkv)
    e2 = rel(got[b + "ff_context.net.0.proj"].delta(torch.float64), want_fc1)
    assert max(e1, e2) < 1e-5, (e1, e2)
    fn = base_weights(str(tmp_path / "ckpt.safetensors"))
    assert torch.equal(fn(b + "attn.add_v_proj"), ck[pre + "context_block.attn.qkv.weight"][2 * h:])
    assert fn.shape("text_encoder_2.text_model.encoder.layers.2.mlp.fc1") == (8, 4)      # SD3 single file's CLIP-G
    assert fn.shape("text_encoder.text_model.encoder.layers.2.self_attn.q_proj") == (4, 4)


def test_fused_dora_with_a_missing_base_part_names_file_and_key(tmp_path):
    """The checkpoint has no img_attn.qkv: the fused DoRA module's error names the file and its key."""
    ck = _flux_ckpt("model.diffusion_model.")
    del ck["model.diffusion_model.double_blocks.0.img_attn.qkv.weight"]
    save_file(ck, str(tmp_path / "ckpt.safetensors"))
    name = "lora_unet_double_blocks_0_img_attn_qkv"
    save_file(_dora(name, 3 * FLUX_H, FLUX_H), str(tmp_path / "dora.safetensors"))
    lora = load_lora(str(tmp_path / "dora.safetensors"), base=base_weights(str(tmp_path / "ckpt.safetensors")))
    assert len(lora) == 3
    with pytest.raises(LoraFormatError) as e:
        lora["transformer.transformer_blocks.0.attn.to_k"].factors()
    assert e.value.key == f"{name}.dora_scale" and "base weight" in str(e.value)
    assert "dora.safetensors" in str(e.value)


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_fused_dora_against_the_connected_model_in_comfyui(family):
    """The ComfyUI node's base lookup (its key maps over a connected MODEL): each part of a fused DoRA
    module is found by its canonical key (ComfyUI's diffusers slice of the fused weight); the stacked
    parts' ΔW = ComfyUI's weight_decompose on the model's fused weight."""
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models

    from domerge_nodes import comfy_glue

    if family == "flux":
        cfg = dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=32,
                   hidden_size=64, mlp_ratio=4.0, num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[8, 12, 12],
                   theta=10000, qkv_bias=True, guidance_embed=True, patch_size=2)
        import dataclasses

        import comfy.ldm.flux.model
        if "txt_ids_dims" in {f.name for f in dataclasses.fields(comfy.ldm.flux.model.FluxParams)}:
            cfg["txt_ids_dims"] = []
        model = comfy.supported_models.Flux(cfg).get_model({}, "", device="cpu")
        names = {"lora_unet_double_blocks_0_img_attn_qkv": "diffusion_model.double_blocks.0.img_attn.qkv.weight",
                 "lora_unet_single_blocks_0_linear1": "diffusion_model.single_blocks.0.linear1.weight"}
    else:
        from test_formats_sd3 import SD3_CFG
        model = comfy.supported_models.SD3(dict(SD3_CFG)).get_model({}, "", device="cpu")
        names = {"lora_unet_joint_blocks_1_context_block_attn_qkv":
                 "diffusion_model.joint_blocks.1.context_block.attn.qkv.weight",
                 "lora_unet_joint_blocks_0_x_block_attn2_qkv": "diffusion_model.joint_blocks.0.x_block.attn2.qkv.weight"}
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"),
                                               offload_device=torch.device("cpu"))
    sd, want = {}, {}
    sdm = model.state_dict()
    for name, wkey in names.items():
        W = sdm[wkey].detach().float()
        sd.update(_dora(name, *W.shape))
        want[name] = _comfy(sd, name, W, strength=1.0)
    lora = load_lora_sd(sd, base=comfy_glue.base_weight_fn(model=patcher))
    errs = {}
    for name in names:
        parts = [m for m in lora if m.source_name == name]
        assert len(parts) in (3, 4)
        errs[name] = rel(torch.cat([m.delta(torch.float64) for m in parts]), want[name])
    assert max(errs.values()) < 1e-5, errs


def load_lora_sd(sd, base):
    from domerge_core import load_state_dict
    return load_state_dict(sd, source="fused_dora", base=base)
