"""Old diffusers attention-processor files, ComfyUI lora_A names, kohya Flux fused qkv."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from conftest import assert_same_deltas, needs_diffusers, rel_err
from domerge_core.formats import canonical as align
from domerge_core.testing import tiny
from domerge_core.formats import load_lora, load_state_dict, save_lora
from test_formats_kohya import assert_matches_diffusers

_TE_OLD = {"q_proj": "to_q", "k_proj": "to_k", "v_proj": "to_v", "out_proj": "to_out"}


def old_diffusers_state_dict(lora, unet_prefix="unet."):
    """diffusers <= 0.20 naming: attn processors (``…attn1.processor.to_q_lora.down.weight``), text
    encoder ``self_attn.to_q_lora`` / ``mlp.fc1.lora_linear_layer``, other modules ``.lora.down.weight``.
    No alphas: the scale is baked into up."""
    sd = {}
    for m in lora:
        comp, path = m.key.split(".", 1)
        up, down = tiny._up_down(m)
        up = up * m.scale
        parts = path.split(".")
        if comp == "unet":
            if parts[-1] in ("to_q", "to_k", "to_v"):
                name = ".".join(parts[:-1] + ["processor", parts[-1] + "_lora"])
            elif parts[-2:] == ["to_out", "0"]:
                name = ".".join(parts[:-2] + ["processor", "to_out_lora"])
            else:
                name = path + ".lora"
            name = unet_prefix + name
        else:
            if parts[-2] == "self_attn":
                name = ".".join(parts[:-1] + [_TE_OLD[parts[-1]] + "_lora"])
            else:
                name = path + ".lora_linear_layer"
            name = comp + "." + name
        sd[name + ".down.weight"], sd[name + ".up.weight"] = down, up.contiguous()
    return sd


@needs_diffusers
def test_old_diffusers_format_matches_diffusers(tmp_path, sd1_pipe, sd1_lora, ref_deltas):
    sd = old_diffusers_state_dict(sd1_lora)
    assert any(".processor.to_out_lora." in k for k in sd) and any("lora_linear_layer" in k for k in sd)
    path = str(tmp_path / "pytorch_lora_weights.safetensors")
    save_file(sd, path)
    lora = load_lora(path)
    assert lora.format == "diffusers_old"
    assert_same_deltas(lora, ref_deltas(sd1_lora))
    assert_matches_diffusers(sd1_pipe, path, lora)
    out = save_lora(lora, str(tmp_path / "new.safetensors"), format=None)   # its own layout: diffusers
    assert load_lora(out).format == "diffusers"


def test_oldest_diffusers_format_without_unet_prefix(sd1_lora, ref_deltas):
    unet_only = type(sd1_lora)(modules={k: m for k, m in sd1_lora.modules.items() if k.startswith("unet.")},
                               format="merged")
    lora = load_state_dict(old_diffusers_state_dict(unet_only, unet_prefix=""))
    assert lora.format == "diffusers_old"
    assert_same_deltas(lora, ref_deltas(unet_only))


def test_comfy_diffusion_model_keys_with_lora_A(sd1_lora, ref_deltas):
    """``diffusion_model.<SGM path>.lora_A.weight`` (ComfyUI accepts any suffix after the module)."""
    sd = {}
    for m in sd1_lora:
        comp, path = m.key.split(".", 1)
        if comp != "unet":
            continue
        up, down = tiny._up_down(m)
        name = "diffusion_model." + align.diffusers_to_sgm(path)
        sd[name + ".lora_A.weight"], sd[name + ".lora_B.weight"] = down, up * m.scale
    lora = load_state_dict(sd, source="comfy_lora_A.safetensors")
    assert lora.format == "comfy"
    assert any(m.source_name.startswith("diffusion_model.input_blocks") for m in lora)
    unet_ref = {k: v for k, v in ref_deltas(sd1_lora).items() if k.startswith("unet.")}
    assert_same_deltas(lora, unet_ref)


# --------------------------------------------------------------------------- Flux
H = 8          # tiny Flux hidden size


def _flux_kohya(seed=0, r=2):
    g = torch.Generator().manual_seed(seed)
    shapes = {"double_blocks_0_img_attn_qkv": (3 * H, H), "double_blocks_0_txt_attn_qkv": (3 * H, H),
              "double_blocks_0_img_attn_proj": (H, H), "double_blocks_0_img_mlp_0": (4 * H, H),
              "double_blocks_0_img_mlp_2": (H, 4 * H), "double_blocks_0_txt_mod_lin": (6 * H, H),
              "single_blocks_1_linear1": (7 * H, H), "single_blocks_1_linear2": (H, 5 * H),
              "single_blocks_1_modulation_lin": (3 * H, H)}
    sd = {}
    for n, (o, i) in shapes.items():
        sd[f"lora_unet_{n}.lora_down.weight"] = torch.randn(r, i, generator=g)
        sd[f"lora_unet_{n}.lora_up.weight"] = torch.randn(o, r, generator=g)
        sd[f"lora_unet_{n}.alpha"] = torch.tensor(1.0)
    return sd


def test_kohya_flux_fused_qkv_is_split_like_diffusers():
    sd = _flux_kohya()
    lora = load_state_dict(sd, source="flux.safetensors")
    assert lora.base_model == "flux"
    keys = set(lora.modules)
    for k in ("transformer.transformer_blocks.0.attn.to_q", "transformer.transformer_blocks.0.attn.to_k",
              "transformer.transformer_blocks.0.attn.to_v", "transformer.transformer_blocks.0.attn.add_q_proj",
              "transformer.transformer_blocks.0.attn.to_out.0", "transformer.transformer_blocks.0.ff.net.0.proj",
              "transformer.transformer_blocks.0.ff.net.2", "transformer.transformer_blocks.0.norm1_context.linear",
              "transformer.single_transformer_blocks.1.attn.to_q", "transformer.single_transformer_blocks.1.proj_mlp",
              "transformer.single_transformer_blocks.1.proj_out", "transformer.single_transformer_blocks.1.norm.linear"):
        assert k in keys, k
    # the split pieces stack back to the fused update: rows q | k | v (| mlp)
    fused = 0.5 * sd["lora_unet_single_blocks_1_linear1.lora_up.weight"] @ \
        sd["lora_unet_single_blocks_1_linear1.lora_down.weight"]
    parts = [lora[f"transformer.single_transformer_blocks.1.{p}"].delta()
             for p in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")]
    assert [p.shape[0] for p in parts] == [H, H, H, 4 * H]
    assert rel_err(torch.cat(parts), fused) < 1e-6


@needs_diffusers
def test_flux_split_matches_diffusers_converter_on_real_dims():
    """diffusers' kohya-Flux converter hard-codes Flux.1 widths: compare on one real-width block of
    each kind (rank 1 keeps it small)."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers
    g = torch.Generator().manual_seed(0)
    h = 3072
    shapes = {"double_blocks_0_img_attn_qkv": (3 * h, h), "double_blocks_0_txt_attn_qkv": (3 * h, h),
              "single_blocks_0_linear1": (3 * h + 4 * h, h)}
    sd = {}
    for n, (o, i) in shapes.items():
        sd[f"lora_unet_{n}.lora_down.weight"] = torch.randn(1, i, generator=g)
        sd[f"lora_unet_{n}.lora_up.weight"] = torch.randn(o, 1, generator=g)
        sd[f"lora_unet_{n}.alpha"] = torch.tensor(1.0)
    ours = load_state_dict(dict(sd))
    try:
        theirs = _convert_kohya_flux_lora_to_diffusers({k: v.clone() for k, v in sd.items()})
    except Exception as e:  # the converter wants every block present in some versions
        pytest.fail(f"diffusers converter failed on a partial Flux LoRA: {e}")
    mods = {k.rsplit(".lora_", 1)[0] for k in theirs}
    assert mods == set(ours.modules)
    x = torch.randn(h, 4, generator=g, dtype=torch.float64)      # probe ΔW·x instead of building ΔW
    for key in mods:
        want = theirs[key + ".lora_B.weight"].double() @ (theirs[key + ".lora_A.weight"].double() @ x)
        up, down = ours[key].scaled_factors(torch.float64)
        assert rel_err(up @ (down @ x), want) < 1e-6, key
