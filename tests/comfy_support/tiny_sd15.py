"""A small random checkpoint that real ComfyUI detects as SD1.5, and LoRAs for it (test-only).

ComfyUI infers the UNet layout from state-dict shapes and `supported_models.SD15` pins only
``context_dim=768, model_channels=320, use_linear_in_transformer=False``, so a 2-level UNet
(320/640 channels, one ResBlock + one SpatialTransformer per level, ~107 M parameters) is "SD1.5".
The CLIP-L text encoder and the VAE have fixed configs and are full size. Module names and shapes
come from ComfyUI's own classes built on the ``meta`` device (library mode: call
`runtime.import_comfy_library()` first); values are random (fan-in scaled normal weights, unit
norm gains — every 1-D weight —, zero biases). Nothing is downloaded.

LoRAs (random, non-zero up *and* down so every update counts), written as safetensors:
- ``tiny_kohya_a``: kohya names, rank 4, alpha 4; attention, feed-forward, 1×1 proj_in/out,
  3×3 resnet convs, and the text encoder's attention + MLP,
- ``tiny_kohya_b``: kohya names, rank 8, alpha 1; attention + text-encoder attention,
- ``tiny_peft_c``: diffusers/PEFT names (``unet.…lora_A.weight``, ``text_encoder.…``), rank 6, no
  alpha (scale 1); attention q/k/v/out + text-encoder q/k/v/out.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Tuple

import torch
from safetensors.torch import save_file

UNET_CONFIG = dict(
    image_size=32, in_channels=4, out_channels=4, model_channels=320,
    num_res_blocks=[1, 1], channel_mult=[1, 2], transformer_depth=[1, 1],
    transformer_depth_output=[1, 1, 1, 1], transformer_depth_middle=1,
    use_spatial_transformer=True, context_dim=768, num_heads=8, num_head_channels=-1,
    use_linear_in_transformer=False, legacy=False, adm_in_channels=None,
    use_temporal_attention=False, use_temporal_resblock=False,
)
VAE_DDCONFIG = {'double_z': True, 'z_channels': 4, 'resolution': 256, 'in_channels': 3, 'out_ch': 3,
                'ch': 128, 'ch_mult': [1, 2, 4, 4], 'num_res_blocks': 2, 'attn_resolutions': [],
                'dropout': 0.0}
TE_LAYERS = 12
TE_ATTN = ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj")
TE_MLP = ("mlp_fc1", "mlp_fc2")


def _meta_shapes() -> Dict[str, Tuple[int, ...]]:
    """Checkpoint key -> shape, from ComfyUI's own SD1.5 classes on the meta device."""
    import comfy.ops
    import comfy.sd1_clip
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    ops = comfy.ops.disable_weight_init
    shapes: Dict[str, Tuple[int, ...]] = {}
    unet = UNetModel(**UNET_CONFIG, device="meta", operations=ops)
    for k, v in unet.state_dict().items():
        shapes["model.diffusion_model." + k] = tuple(v.shape)
    with torch.device("meta"):
        clip = comfy.sd1_clip.SDClipModel(device="meta")
        vae = AutoencoderKL(ddconfig=VAE_DDCONFIG, embed_dim=4)
    for k, v in clip.state_dict().items():
        if k.startswith("transformer."):
            shapes["cond_stage_model." + k] = tuple(v.shape)
    for k, v in vae.state_dict().items():
        shapes["first_stage_model." + k] = tuple(v.shape)
    return shapes


def _random_tensor(key: str, shape: Tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    if len(shape) == 0:
        return torch.zeros(())
    last = key.rsplit(".", 1)[-1]
    if len(shape) == 1:
        if last == "bias":
            return torch.zeros(shape)
        # every 1-D ``weight`` in these models is a norm gain, whatever its name: ComfyUI's UNet calls
        # its GroupNorms ``in_layers.0``, ``out_layers.0`` and ``out.0`` — a zero there (e.g. the final
        # ``out.0``) makes the UNet output exactly zero and every image identical, LoRA or not
        if last == "weight":
            return torch.ones(shape)
        raise ValueError(f"unexpected 1-D tensor {key} {shape}")
    if "embedding" in key:
        return torch.randn(shape, generator=g) * 0.02
    fan_in = math.prod(shape[1:])
    return torch.randn(shape, generator=g) / math.sqrt(fan_in)


def write_checkpoint(path: Path, seed: int = 0) -> Path:
    """A random SD1.5-detected checkpoint (fp16 safetensors, ~630 MB)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in _meta_shapes().items():
        if k.endswith("position_ids"):
            continue
        sd[k] = _random_tensor(k, shape, g).to(torch.float16)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path))
    return path


def _unet_targets() -> List[Tuple[str, str]]:
    """(diffusers module path, comfy checkpoint key of its weight) for the tiny UNet."""
    import comfy.utils

    cfg = dict(UNET_CONFIG)
    cfg["num_res_blocks"] = list(cfg["num_res_blocks"])
    out = []
    for diff_key, comfy_key in comfy.utils.unet_to_diffusers(cfg).items():
        if diff_key.endswith(".weight"):
            out.append((diff_key[: -len(".weight")], "model.diffusion_model." + comfy_key))
    return out


_ATTN = (".to_q", ".to_k", ".to_v", ".to_out.0")
_FF = (".ff.net.0.proj", ".ff.net.2")
_PROJ = (".proj_in", ".proj_out")
_CONV = (".conv1", ".conv2")


def _pick(targets, suffixes, resnet_only=False):
    return [(d, c) for d, c in targets if d.endswith(suffixes) and (not resnet_only or ".resnets." in d)]


def _factors(shape: Tuple[int, ...], rank: int, g: torch.Generator):
    out_f = shape[0]
    if len(shape) == 4:
        down = torch.randn(rank, shape[1], shape[2], shape[3], generator=g) / math.sqrt(math.prod(shape[1:]))
        up = torch.randn(out_f, rank, 1, 1, generator=g) * 0.5
    else:
        down = torch.randn(rank, shape[1], generator=g) / math.sqrt(shape[1])
        up = torch.randn(out_f, rank, generator=g) * 0.5
    return up, down


def write_loras(folder: Path, seed: int = 1) -> Dict[str, Path]:
    """The three LoRAs described in the module docstring; returns name -> path."""
    shapes = _meta_shapes()
    targets = _unet_targets()
    g = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    te_shape = {"self_attn_q_proj": (768, 768), "self_attn_k_proj": (768, 768), "self_attn_v_proj": (768, 768),
                "self_attn_out_proj": (768, 768), "mlp_fc1": (3072, 768), "mlp_fc2": (768, 3072)}
    out: Dict[str, Path] = {}

    def kohya(name, unet_mods, te_mods, rank, alpha):
        sd = {}
        for diff, ckey in unet_mods:
            base = "lora_unet_" + diff.replace(".", "_")
            up, down = _factors(shapes[ckey], rank, g)
            sd[base + ".lora_up.weight"], sd[base + ".lora_down.weight"] = up, down
            sd[base + ".alpha"] = torch.tensor(float(alpha))
        for i in range(TE_LAYERS):
            for m in te_mods:
                base = f"lora_te_text_model_encoder_layers_{i}_{m}"
                up, down = _factors(te_shape[m], rank, g)
                sd[base + ".lora_up.weight"], sd[base + ".lora_down.weight"] = up, down
                sd[base + ".alpha"] = torch.tensor(float(alpha))
        meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank),
                "ss_network_alpha": str(alpha), "ss_base_model_version": "sd_v1"}
        p = folder / f"{name}.safetensors"
        save_file({k: v.to(torch.float16).contiguous() for k, v in sd.items()}, str(p), metadata=meta)
        out[name] = p

    kohya("tiny_kohya_a", _pick(targets, _ATTN + _FF + _PROJ) + _pick(targets, _CONV, resnet_only=True),
          TE_ATTN + TE_MLP, rank=4, alpha=4)
    kohya("tiny_kohya_b", _pick(targets, _ATTN), TE_ATTN, rank=8, alpha=1)

    sd = {}
    for diff, ckey in _pick(targets, _ATTN):
        up, down = _factors(shapes[ckey], 6, g)
        sd[f"unet.{diff}.lora_A.weight"], sd[f"unet.{diff}.lora_B.weight"] = down, up
    for i in range(TE_LAYERS):
        for m in TE_ATTN:
            up, down = _factors(te_shape[m], 6, g)
            path = f"text_encoder.text_model.encoder.layers.{i}.self_attn.{m.split('_', 2)[2]}"
            sd[path + ".lora_A.weight"], sd[path + ".lora_B.weight"] = down, up
    p = folder / "tiny_peft_c.safetensors"
    save_file({k: v.to(torch.float16).contiguous() for k, v in sd.items()}, str(p))
    out["tiny_peft_c"] = p
    return out
