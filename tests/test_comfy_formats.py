"""Every output layout the CLI / Save node / panel offers loads completely in ComfyUI's stock loader,
or is refused for that model family (format × SD1.5 / SDXL / Flux, real ComfyUI code in library mode).

SD1.5: the tiny checkpoint, real files, the stock ``LoraLoader``; the patched weights equal what the
kohya file patches. SDXL and Flux: ComfyUI's own key maps (``comfy.lora.model_lora_keys_unet/clip``)
of models built from small configs on the ``meta`` device, and ``comfy.lora.load_lora`` on the written
file: no "lora key not loaded", one patch per module. The diffusers side (``load_lora_weights``, the
image changes as the input LoRA does) is tests/test_roundtrip.py.
"""
from __future__ import annotations

import logging
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from comfy_support import library, runtime

torch.set_num_threads(1)
runtime.import_comfy_library()

import comfy.lora  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.sdxl_clip  # noqa: E402
import comfy.supported_models  # noqa: E402
import comfy.utils  # noqa: E402
import nodes as comfy_nodes  # noqa: E402

import domerge_core  # noqa: E402
import domerge_nodes  # noqa: E402
from domerge_nodes import comfy_glue  # noqa: E402

NOT_LOADED = ("lora key not loaded", "NOT LOADED", "SHAPE MISMATCH")


def _quiet(caplog):
    return not any(s in caplog.text for s in NOT_LOADED)


@pytest.fixture()
def folders(tmp_path):
    dirs = library.setup_folders(tmp_path)
    return dirs, library.tiny_loras(dirs["loras"])


def _merged(loras):
    inputs = [domerge_core.load_lora(str(loras[n])) for n in ("tiny_kohya_a", "tiny_kohya_b", "tiny_peft_c")]
    return domerge_core.merge(inputs, "ta", weights=[0.7, -0.5, 1.2])


@pytest.mark.parametrize("fmt", list(domerge_core.FORMATS))
def test_sd15_each_format_loads_completely_in_the_stock_loader_or_is_refused(folders, caplog, fmt):
    dirs, loras = folders
    res = _merged(loras)
    if fmt not in domerge_core.loadable_formats(res.lora):
        assert fmt == "peft"
        with pytest.raises(domerge_core.LoraFormatError, match="does not load in ComfyUI"):
            domerge_core.check_loadable(res.lora, fmt)
        # the Save node refuses it before writing anything
        merged = domerge_nodes.NODE_CLASS_MAPPINGS["DomergeMergeLoras"]
        node_out = _node_merge(merged)
        with pytest.raises(comfy_glue.NodeInputError, match="format 'peft'"):
            domerge_nodes.NODE_CLASS_MAPPINGS["DomergeSaveLora"]().save(node_out, "refused", fmt, "fp32")
        assert not list(dirs["loras"].rglob("refused*"))
        return
    res.save(str(dirs["loras"] / f"m_{fmt}.safetensors"), format=fmt, dtype=torch.float32)
    res.save(str(dirs["loras"] / "m_ref.safetensors"), format="kohya", dtype=torch.float32)
    import folder_paths
    folder_paths.filename_list_cache.clear()
    model, clip, _ = library.load_checkpoint()
    with caplog.at_level(logging.WARNING):
        m, c = comfy_nodes.LoraLoader().load_lora(model, clip, f"m_{fmt}.safetensors", 1.0, 1.0)
    assert _quiet(caplog), caplog.text[-2000:]
    assert len(m.patches) == 100 and len(c.patcher.patches) == 72     # every module of the tiny LoRAs
    r, rc = comfy_nodes.LoraLoader().load_lora(model, clip, "m_ref.safetensors", 1.0, 1.0)
    for got, want, base in ((m, r, model), (c.patcher, rc.patcher, clip.patcher)):
        for key in want.patches:
            b = library.patched_weight(base, key)
            d_got, d_want = library.patched_weight(got, key) - b, library.patched_weight(want, key) - b
            assert float((d_got - d_want).norm()) <= 1e-4 * float(d_want.norm()), key


def _node_merge(merged_cls):
    node = merged_cls()
    req = merged_cls.INPUT_TYPES()["required"]
    widgets = {k: v[1]["default"] for k, v in req.items() if k not in ("loras", "method")}
    loras = [{"name": n, "strength": 1.0} for n in ("tiny_kohya_a.safetensors", "tiny_kohya_b.safetensors")]
    out, _ = node.merge(loras, "ta", **widgets)
    return out


# ---------------------------------------------------------------------------------------------
# SDXL and Flux through ComfyUI's key maps (small configs, meta device: names and shapes only)
# ---------------------------------------------------------------------------------------------
SDXL_UNET = dict(use_checkpoint=False, image_size=32, out_channels=4, use_spatial_transformer=True, legacy=False,
                 num_classes="sequential", adm_in_channels=2816, in_channels=4, model_channels=320,
                 num_res_blocks=[2, 2], transformer_depth=[0, 0, 1, 1], transformer_depth_output=[0, 0, 0, 1, 1, 1],
                 channel_mult=[1, 2], transformer_depth_middle=1, use_linear_in_transformer=True, context_dim=2048,
                 num_head_channels=64, use_temporal_attention=False, use_temporal_resblock=False)
FLUX = dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096,
            hidden_size=3072, mlp_ratio=4.0, num_heads=24, depth=1, depth_single_blocks=1, axes_dim=[16, 56, 56],
            theta=10000, qkv_bias=True, guidance_embed=True, patch_size=2)


def _factors(shape, rank, g):
    fan_in = math.prod(shape[1:])
    if len(shape) == 4:
        down = torch.randn(rank, *shape[1:], generator=g) / math.sqrt(fan_in)
        up = torch.randn(shape[0], rank, 1, 1, generator=g) * 0.5
    else:
        down = torch.randn(rank, shape[1], generator=g) / math.sqrt(shape[1])
        up = torch.randn(shape[0], rank, generator=g) * 0.5
    return up, down


def _kohya_file(path, names_shapes, rank=4):
    g = torch.Generator().manual_seed(0)
    sd = {}
    for name, shape in names_shapes:
        up, down = _factors(shape, rank, g)
        sd[name + ".lora_up.weight"], sd[name + ".lora_down.weight"] = up, down
        sd[name + ".alpha"] = torch.tensor(float(rank))
    save_file(sd, str(path))
    return path


def _sdxl():
    model = comfy.supported_models.SDXL(dict(SDXL_UNET)).get_model({}, "", device="meta")
    key_map = comfy.lora.model_lora_keys_unet(model, {})
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    names = []
    for diff, ck in comfy.utils.unet_to_diffusers(dict(SDXL_UNET)).items():
        shape = shapes.get("diffusion_model." + ck)
        if diff.endswith(".weight") and shape and len(shape) in (2, 4) and (
                ".attentions." in diff or ".resnets." in diff):
            names.append(("lora_unet_" + diff[: -len(".weight")].replace(".", "_"), shape))
    # both SDXL text encoders: ComfyUI's own CLIP-L / CLIP-G classes on the meta device
    with torch.device("meta"):
        clip = comfy.sdxl_clip.SDXLClipModel(device="meta")
    key_map = comfy.lora.model_lora_keys_clip(clip, key_map)
    csd = clip.state_dict()
    for enc, prefix in (("clip_l", "lora_te1_"), ("clip_g", "lora_te2_")):
        for i in (0, 5):
            for m in ("self_attn.q_proj", "self_attn.out_proj", "mlp.fc1"):
                shape = tuple(csd[f"{enc}.transformer.text_model.encoder.layers.{i}.{m}.weight"].shape)
                names.append((f"{prefix}text_model_encoder_layers_{i}_{m.replace('.', '_')}", shape))
    return key_map, names


def _flux_config():
    """FLUX, plus what newer ComfyUI's FluxParams requires and its model detection sets for Flux.1
    (``txt_ids_dims``: none of the text ids carry positions); 0.3.75 has no such field."""
    import dataclasses

    import comfy.ldm.flux.model

    cfg = dict(FLUX)
    if "txt_ids_dims" in {f.name for f in dataclasses.fields(comfy.ldm.flux.model.FluxParams)}:
        cfg["txt_ids_dims"] = []
    return cfg


def _flux():
    model = comfy.supported_models.Flux(_flux_config()).get_model({}, "", device="meta")
    key_map = comfy.lora.model_lora_keys_unet(model, {})
    sd = model.state_dict()
    names = []
    for k, v in sd.items():       # BFL names as kohya/ai-toolkit write them (fused qkv split by the reader)
        if k.endswith(".weight") and v.ndim == 2 and ("double_blocks.0." in k or "single_blocks.0." in k) \
                and "norm" not in k:
            names.append(("lora_unet_" + k[len("diffusion_model."):-len(".weight")].replace(".", "_"), tuple(v.shape)))
    return key_map, names


@pytest.mark.parametrize("family", ["sdxl", "flux"])
@pytest.mark.parametrize("fmt", list(domerge_core.FORMATS))
def test_sdxl_and_flux_each_format_maps_every_key_in_comfyui(tmp_path, caplog, family, fmt):
    key_map, names = _sdxl() if family == "sdxl" else _flux()
    src = domerge_core.load_lora(str(_kohya_file(tmp_path / f"{family}.safetensors", names)))
    assert len(src) >= len(names) > 10
    if fmt not in domerge_core.loadable_formats(src):
        with pytest.raises(domerge_core.LoraFormatError, match="does not load"):
            domerge_core.check_loadable(src, fmt)
        return
    out = domerge_core.save_lora(src, str(tmp_path / f"out.{fmt}.safetensors"), format=fmt)
    sd = load_file(out)
    with caplog.at_level(logging.WARNING):
        patches = comfy.lora.load_lora(sd, key_map)
    assert _quiet(caplog), caplog.text[-2000:]
    # every module lands: as many patches as the input has modules in ComfyUI's terms (Flux: the
    # split q/k/v of a fused qkv land as slices of one weight, so count the kohya file's own patches)
    want = comfy.lora.load_lora(load_file(str(tmp_path / f"{family}.safetensors")), key_map)

    def weights(p):
        return {k if isinstance(k, str) else k[0] for k in p}

    assert weights(patches) == weights(want) and len(want) >= len(names), (len(patches), len(want))
