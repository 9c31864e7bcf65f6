"""One key space: kohya names, SDXL SGM names, diffusers/PEFT names and bare CLIP names line up;
the built-in SGM table agrees with diffusers' own converter on real key sets."""
from __future__ import annotations

import pytest
import torch

from conftest import assert_same_deltas, needs_diffusers, rel_err
from domerge_core.formats import canonical as align
from domerge_core.testing import tiny
from domerge_core.formats import load_lora, load_state_dict

SDXL_LIKE = dict(  # real SDXL block structure (layers per block, transformer depths), tiny widths
    sample_size=32, layers_per_block=2, block_out_channels=(32, 64, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(2, 4, 4), cross_attention_dim=64,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=80, norm_num_groups=32)
SD15_LIKE = dict(  # real SD1.5 block structure, tiny widths
    sample_size=32, layers_per_block=2, block_out_channels=(32, 32, 64, 64),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=32,
    attention_head_dim=8, norm_num_groups=32)


def _meta_unet(cfg):
    from diffusers import UNet2DConditionModel
    with torch.device("meta"):
        return UNet2DConditionModel(**cfg)


def _kohya_keys(paths, sgm):
    sd = {}
    for p in paths:
        n = "lora_unet_" + (align.diffusers_to_sgm(p) if sgm else p).replace(".", "_")
        sd[n + ".lora_down.weight"] = torch.zeros(1, 1)
        sd[n + ".lora_up.weight"] = torch.zeros(1, 1)
        sd[n + ".alpha"] = torch.tensor(1.0)
    return sd


@needs_diffusers
def test_sgm_mapping_agrees_with_diffusers_converter():
    """Every kohya LoCon target of an SDXL-structured UNet, written with SGM names, maps to the same
    diffusers modules through our table as through diffusers' lora_state_dict (SGM remap + kohya
    conversion) — and to the UNet's real module paths."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_unet_state_dict_to_peft

    unet = _meta_unet(SDXL_LIKE)
    paths = [p for p, _ in tiny._kohya_targets(unet, tiny.UNET_ATTN_PARENTS + tiny.UNET_CONV_PARENTS, True)]
    assert len(paths) > 700
    sd = _kohya_keys(paths, sgm=True)
    assert any("input_blocks" in k for k in sd) and any("_op." in k for k in sd) and any("in_layers_2" in k for k in sd)
    converted, _ = StableDiffusionXLPipeline.lora_state_dict(dict(sd), unet_config=unet.config)
    theirs = {k.rsplit(".lora", 1)[0] for k in convert_unet_state_dict_to_peft(converted)}
    ours = set(load_state_dict(sd).modules)
    assert ours == theirs
    assert ours == {"unet." + p for p in paths}
    for p in paths:
        assert align.sgm_to_diffusers(align.diffusers_to_sgm(p)) == p


@needs_diffusers
def test_kohya_names_redot_to_real_module_paths():
    """kohya flattens '.' to '_'; our vocabulary puts the dots back for every SD1.5-structured UNet
    target and every CLIP target."""
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = _meta_unet(SD15_LIKE)
    paths = [p for p, _ in tiny._kohya_targets(unet, tiny.UNET_ATTN_PARENTS + tiny.UNET_CONV_PARENTS, True)]
    for p in paths:
        assert align.kohya_path(p.replace(".", "_")) == p
    with torch.device("meta"):
        te = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                          num_attention_heads=4))
    for p, _ in tiny._kohya_targets(te, tiny.TE_PARENTS, False):
        full = p if p.startswith("text_model.") else "text_model." + p
        assert align.kohya_path(full.replace(".", "_")) == full
        assert align.clip_path(align.kohya_path(p.replace(".", "_"))) == full     # bare names too


def test_sgm_top_level_and_upsampler_without_attention():
    assert align.sgm_to_diffusers("input_blocks.0.0") == "conv_in"
    assert align.sgm_to_diffusers("out.2") == "conv_out"
    assert align.sgm_to_diffusers("time_embed.0") == "time_embedding.linear_1"
    assert align.sgm_to_diffusers("label_emb.0.2") == "add_embedding.linear_2"
    assert align.sgm_to_diffusers("output_blocks.2.2.conv") == "up_blocks.0.upsamplers.0.conv"
    assert align.sgm_to_diffusers("output_blocks.2.1.conv") == "up_blocks.0.upsamplers.0.conv"   # no attention
    assert align.sgm_to_diffusers("middle_block.2.emb_layers.1") == "mid_block.resnets.1.time_emb_proj"
    assert align.sgm_to_diffusers("input_blocks.3.0.op") == "down_blocks.0.downsamplers.0.conv"


def test_same_lora_as_kohya_and_peft_aligns_module_for_module(lora_files, sd1_lora, ref_deltas):
    k = load_lora(lora_files["sd1_kohya"])
    p = load_lora(lora_files["sd1_peft"])
    assert list(k.modules) == list(p.modules)
    for key in k.modules:
        a, b = k[key], p[key]
        assert (a.out_features, a.in_features, a.rank, a.kind, a.kernel_size) == \
               (b.out_features, b.in_features, b.rank, b.kind, b.kernel_size)
        assert rel_err(a.delta(), b.delta()) < 1e-6, key


def test_sdxl_sgm_kohya_and_diffusers_named_align(lora_files, sdxl_lora, ref_deltas):
    sgm = load_lora(lora_files["sdxl_kohya_sgm"])
    dm = load_lora(lora_files["sdxl_kohya_dm"])
    peft = load_lora(lora_files["sdxl_peft"])
    assert sgm.layout["unet_names"] == "sgm" and dm.layout["unet_names"] == "diffusers"
    assert set(sgm.modules) == set(dm.modules) == set(peft.modules)
    for lora in (sgm, dm, peft):
        assert_same_deltas(lora, ref_deltas(sdxl_lora))


def test_comfy_native_keys_align_with_kohya(sdxl_lora, ref_deltas):
    """ComfyUI's own names: diffusion_model.<SGM path> and text_encoders.clip_l/clip_g.transformer.…"""
    comfy = {}
    for m in sdxl_lora:
        comp, path = m.key.split(".", 1)
        name = {"unet": lambda: "diffusion_model." + align.diffusers_to_sgm(path),
                "text_encoder": lambda: "text_encoders.clip_l.transformer." + path,
                "text_encoder_2": lambda: "text_encoders.clip_g.transformer." + path}[comp]()
        up, down = tiny._up_down(m)
        comfy[name + ".lora_up.weight"], comfy[name + ".lora_down.weight"] = up, down
        comfy[name + ".alpha"] = torch.tensor(m.scale * m.rank)
    lora = load_state_dict(comfy, source="comfy.safetensors")
    assert lora.format == "comfy"
    assert any(m.source_name.startswith("diffusion_model.input_blocks.") for m in lora)
    assert_same_deltas(lora, ref_deltas(sdxl_lora))


@pytest.mark.parametrize("prefix", ["text_encoder.text_model.", "text_encoder."])
def test_text_model_prefix_optional_in_peft_names(prefix):
    g = torch.Generator().manual_seed(0)
    sd = {f"{prefix}encoder.layers.0.self_attn.k_proj.lora_A.weight": torch.randn(2, 8, generator=g),
          f"{prefix}encoder.layers.0.self_attn.k_proj.lora_B.weight": torch.randn(8, 2, generator=g)}
    assert list(load_state_dict(sd).modules) == ["text_encoder.text_model.encoder.layers.0.self_attn.k_proj"]
