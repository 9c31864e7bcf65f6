"""Key layouts beyond kohya / diffusers / PEFT: XLabs Flux, OneTrainer, SimpleTuner LyCORIS names.
Each read is compared with what ComfyUI's own loader path patches into the same (fused) weight."""
from __future__ import annotations

import torch

from comfy_support import runtime

from domerge_core import load_state_dict

runtime.import_comfy_library()
import comfy.lora  # noqa: E402
import comfy.lora_convert  # noqa: E402

H, R = 8, 2


def _g(*s, seed=[0]):
    seed[0] += 1
    return torch.randn(*s, generator=torch.Generator().manual_seed(seed[0]), dtype=torch.float64)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def xlabs_sd():
    sd = {}
    for blk, subs in (("double_blocks.18", {"qkv_lora1": 3 * H, "qkv_lora2": 3 * H, "proj_lora1": H, "proj_lora2": H}),
                      ("single_blocks.37", {"qkv_lora": 3 * H})):
        for sub, out in subs.items():
            sd[f"{blk}.processor.{sub}.down.weight"] = _g(R, H)
            sd[f"{blk}.processor.{sub}.up.weight"] = _g(out, R)
    return sd


def test_xlabs_flux_reads_as_comfyui_patches_it():
    sd = xlabs_sd()
    lora = load_state_dict(sd, source="xlabs.safetensors")
    assert lora.format == "xlabs" and lora.base_model == "flux"
    blk = "transformer.transformer_blocks.18"
    assert {f"{blk}.attn.to_q", f"{blk}.attn.add_v_proj", f"{blk}.attn.to_out.0", f"{blk}.attn.to_add_out",
            "transformer.single_transformer_blocks.37.attn.to_k"} <= set(lora.modules)
    # ComfyUI: its converter renames XLabs keys to BFL names; its Flux key map targets fused weights
    conv = comfy.lora_convert.convert_lora(dict(sd))
    km = {}
    for bfl in ("img_attn.qkv", "txt_attn.qkv", "img_attn.proj", "txt_attn.proj"):
        km[f"diffusion_model.double_blocks.18.{bfl}"] = f"diffusion_model.double_blocks.18.{bfl}.weight"
    km["diffusion_model.single_blocks.37.linear1_qkv"] = ("diffusion_model.single_blocks.37.linear1.weight", (0, 0, 3 * H))
    patches = comfy.lora.load_lora(conv, km, log_missing=False)
    assert len(patches) == 5

    def comfy_delta(target, shape, offset=None):
        w = torch.zeros(shape, dtype=torch.float64)
        p = patches[(target, offset) if offset else target]         # ComfyUI keys offset patches by (key, offset)
        return comfy.lora.calculate_weight([(1.0, p, 1.0, offset, None)], w, target,
                                           intermediate_dtype=torch.float64)

    d = lambda k: lora[k].delta(torch.float64)  # noqa: E731
    ours = torch.cat([d(f"{blk}.attn.to_q"), d(f"{blk}.attn.to_k"), d(f"{blk}.attn.to_v")])
    assert _rel(ours, comfy_delta("diffusion_model.double_blocks.18.img_attn.qkv.weight", (3 * H, H))) < 1e-12
    ours = torch.cat([d(f"{blk}.attn.add_q_proj"), d(f"{blk}.attn.add_k_proj"), d(f"{blk}.attn.add_v_proj")])
    assert _rel(ours, comfy_delta("diffusion_model.double_blocks.18.txt_attn.qkv.weight", (3 * H, H))) < 1e-12
    assert _rel(d(f"{blk}.attn.to_out.0"), comfy_delta("diffusion_model.double_blocks.18.img_attn.proj.weight", (H, H))) < 1e-12
    assert _rel(d(f"{blk}.attn.to_add_out"), comfy_delta("diffusion_model.double_blocks.18.txt_attn.proj.weight", (H, H))) < 1e-12
    s = "transformer.single_transformer_blocks.37.attn"
    full = comfy_delta("diffusion_model.single_blocks.37.linear1.weight", (7 * H, H), offset=(0, 0, 3 * H))
    ours = torch.cat([d(f"{s}.to_q"), d(f"{s}.to_k"), d(f"{s}.to_v")])
    assert _rel(ours, full[: 3 * H]) < 1e-12 and full[3 * H:].abs().max() == 0


def test_xlabs_lines_up_with_kohya_flux():
    """The same update in XLabs and kohya Flux names reads to the same canonical modules."""
    sd = xlabs_sd()
    kohya = {}
    for sub, bfl in (("qkv_lora1", "img_attn_qkv"), ("proj_lora2", "txt_attn_proj")):
        kohya[f"lora_unet_double_blocks_18_{bfl}.lora_down.weight"] = sd[f"double_blocks.18.processor.{sub}.down.weight"]
        kohya[f"lora_unet_double_blocks_18_{bfl}.lora_up.weight"] = sd[f"double_blocks.18.processor.{sub}.up.weight"]
    a = load_state_dict(sd, source="x.safetensors")
    b = load_state_dict(kohya, source="k.safetensors")
    assert set(b.modules) <= set(a.modules)
    for k in b.modules:
        assert _rel(a[k].delta(), b[k].delta()) < 1e-12


def test_onetrainer_and_simpletuner_lycoris_names():
    """OneTrainer ``lora_transformer_…`` and SimpleTuner ``lycoris_…`` (diffusers paths, underscores)."""
    for prefix in ("lora_transformer_", "lycoris_"):
        sd = {f"{prefix}single_transformer_blocks_3_attn_to_q.lora_down.weight": _g(R, H),
              f"{prefix}single_transformer_blocks_3_attn_to_q.lora_up.weight": _g(H, R),
              f"{prefix}transformer_blocks_0_attn_add_k_proj.hada_w1_a": _g(H, 2),
              f"{prefix}transformer_blocks_0_attn_add_k_proj.hada_w1_b": _g(2, H),
              f"{prefix}transformer_blocks_0_attn_add_k_proj.hada_w2_a": _g(H, 2),
              f"{prefix}transformer_blocks_0_attn_add_k_proj.hada_w2_b": _g(2, H)}
        lora = load_state_dict(sd, source="x.safetensors")
        assert set(lora.modules) == {"transformer.single_transformer_blocks.3.attn.to_q",
                                     "transformer.transformer_blocks.0.attn.add_k_proj"}, prefix
