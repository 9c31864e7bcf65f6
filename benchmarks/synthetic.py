"""Real-shape synthetic LoRAs for benchmarks (no weights downloaded).

Module lists come from diffusers models instantiated on the ``meta`` device (names and shapes only,
no memory), selected the way kohya's sd-scripts selects them; factors are random but shaped and
scaled like trained ones (``down ~ N(0, 1/fan_in)``, ``up ~ scale·N(0, 1)``).

    python benchmarks/synthetic.py --model sdxl --te --rank 32 --seed 0 -o /tmp/sdxl_a.safetensors
    python benchmarks/synthetic.py --list            # module counts per model family

Used by the speed, memory and live-re-merge benchmarks; importable as ``benchmarks.synthetic``
or by path.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
from typing import Dict, Iterable, Optional, Tuple

import torch

Shape = Tuple[int, ...]

SD15_UNET = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
SDXL_UNET = dict(
    sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
# Flux.1-dev, kohya naming (BFL module names, fused qkv): (name, out, in) per block.
FLUX_HIDDEN, FLUX_MLP = 3072, 12288


def _meta_unet(cfg: dict):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**cfg)


def kohya_unet_modules(unet, conv: bool = False) -> "collections.OrderedDict[str, Shape]":
    """diffusers module path -> weight shape for the modules sd-scripts' networks/lora.py targets."""
    parents = {"Transformer2DModel"} | ({"ResnetBlock2D", "Downsample2D", "Upsample2D"} if conv else set())
    out: "collections.OrderedDict[str, Shape]" = collections.OrderedDict()
    for name, mod in unet.named_modules():
        if mod.__class__.__name__ not in parents:
            continue
        for cname, ch in mod.named_modules():
            if isinstance(ch, torch.nn.Linear):
                out[f"{name}.{cname}"] = (ch.out_features, ch.in_features)
            elif isinstance(ch, torch.nn.Conv2d) and (conv or ch.kernel_size == (1, 1)):
                out[f"{name}.{cname}"] = (ch.out_channels, ch.in_channels, *ch.kernel_size)
    return out


def clip_modules(hidden: int, layers: int, inter: int) -> "collections.OrderedDict[str, Shape]":
    mods: "collections.OrderedDict[str, Shape]" = collections.OrderedDict()
    for i in range(layers):
        p = f"text_model.encoder.layers.{i}."
        for k in ("q_proj", "k_proj", "v_proj", "out_proj"):
            mods[p + "self_attn." + k] = (hidden, hidden)
        mods[p + "mlp.fc1"] = (inter, hidden)
        mods[p + "mlp.fc2"] = (hidden, inter)
    return mods


def flux_kohya_modules(double: int = 19, single: int = 38) -> "collections.OrderedDict[str, Shape]":
    h, m = FLUX_HIDDEN, FLUX_MLP
    mods: "collections.OrderedDict[str, Shape]" = collections.OrderedDict()
    for i in range(double):
        for s in ("img", "txt"):
            mods[f"double_blocks.{i}.{s}_attn.qkv"] = (3 * h, h)
            mods[f"double_blocks.{i}.{s}_attn.proj"] = (h, h)
            mods[f"double_blocks.{i}.{s}_mlp.0"] = (m, h)
            mods[f"double_blocks.{i}.{s}_mlp.2"] = (h, m)
            mods[f"double_blocks.{i}.{s}_mod.lin"] = (6 * h, h)
    for i in range(single):
        mods[f"single_blocks.{i}.linear1"] = (3 * h + m, h)
        mods[f"single_blocks.{i}.linear2"] = (h, h + m)
        mods[f"single_blocks.{i}.modulation.lin"] = (3 * h, h)
    return mods


def dm_to_sgm(path: str, layers_per_block: int = 2) -> str:
    """diffusers UNet path -> the SGM/LDM path kohya uses for SDXL names."""
    p = path.split(".")
    lpb1 = layers_per_block + 1
    res_map = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
               "conv_shortcut": "skip_connection"}

    def tail(kind, rest):
        return [res_map.get(".".join(rest), ".".join(rest))] if kind == "resnets" else rest

    if p[0] == "down_blocks":
        b, kind, j = int(p[1]), p[2], int(p[3])
        if kind == "downsamplers":
            return ".".join(["input_blocks", str((b + 1) * lpb1), "0", "op"])
        return ".".join(["input_blocks", str(b * lpb1 + j + 1), "0" if kind == "resnets" else "1"]
                        + tail(kind, p[4:]))
    if p[0] == "mid_block":
        kind, j = p[1], int(p[2])
        idx = {("resnets", 0): 0, ("attentions", 0): 1, ("resnets", 1): 2}[(kind, j)]
        return ".".join(["middle_block", str(idx)] + tail(kind, p[3:]))
    if p[0] == "up_blocks":
        b, kind, j = int(p[1]), p[2], int(p[3])
        if kind == "upsamplers":
            return ".".join(["output_blocks", str(b * lpb1 + layers_per_block), "2", "conv"])
        return ".".join(["output_blocks", str(b * lpb1 + j), "0" if kind == "resnets" else "1"]
                        + tail(kind, p[4:]))
    return path


def module_list(model: str, te: bool = False, conv: bool = False) -> "collections.OrderedDict[str, Shape]":
    """kohya module name (without the .lora_* suffix) -> weight shape, for a model family."""
    out: "collections.OrderedDict[str, Shape]" = collections.OrderedDict()
    if model == "sd15":
        for path, shape in kohya_unet_modules(_meta_unet(SD15_UNET), conv).items():
            out["lora_unet_" + path.replace(".", "_")] = shape
        tes = [("lora_te", clip_modules(768, 12, 3072))] if te else []
    elif model == "sdxl":
        for path, shape in kohya_unet_modules(_meta_unet(SDXL_UNET), conv).items():
            out["lora_unet_" + dm_to_sgm(path).replace(".", "_")] = shape
        tes = [("lora_te1", clip_modules(768, 12, 3072)), ("lora_te2", clip_modules(1280, 32, 5120))] if te else []
    elif model == "flux":
        for path, shape in flux_kohya_modules().items():
            out["lora_unet_" + path.replace(".", "_")] = shape
        tes = [("lora_te1", clip_modules(768, 12, 3072))] if te else []
    else:
        raise ValueError(f"unknown model family {model!r} (sd15, sdxl, flux)")
    for prefix, mods in tes:
        for path, shape in mods.items():
            out[prefix + "_" + path.replace(".", "_")] = shape
    return out


BASE_VERSION = {"sd15": ("sd_v1", "stable-diffusion-v1/lora"),
                "sdxl": ("sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora"),
                "flux": ("flux1", "flux-1-dev/lora")}


def synthetic_kohya(model: str = "sdxl", rank: int = 32, alpha: Optional[float] = None, te: bool = False,
                    conv_rank: Optional[int] = None, up_scale: float = 0.01, seed: int = 0,
                    dtype: torch.dtype = torch.float16, modules: Optional[Dict[str, Shape]] = None):
    """(state dict, metadata) of a kohya LoRA with real module shapes and random factors."""
    mods = modules if modules is not None else module_list(model, te=te, conv=conv_rank is not None)
    alpha = float(rank if alpha is None else alpha)
    g = torch.Generator().manual_seed(seed)
    sd: Dict[str, torch.Tensor] = {}
    for name, shape in mods.items():
        is3x3 = len(shape) == 4 and tuple(shape[2:]) != (1, 1)
        r, a = (conv_rank, float(conv_rank)) if is3x3 else (rank, alpha)
        k = tuple(shape[2:]) if len(shape) == 4 else ()
        fan_in = shape[1] * (k[0] * k[1] if k else 1)
        down = torch.randn(r, shape[1], *k, generator=g) / fan_in ** 0.5
        up = torch.randn(shape[0], r, *((1, 1) if k else ()), generator=g) * up_scale
        sd[name + ".lora_down.weight"] = down.to(dtype)
        sd[name + ".lora_up.weight"] = up.to(dtype)
        sd[name + ".alpha"] = torch.tensor(a).to(dtype)
    version, arch = BASE_VERSION[model]
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(alpha),
            "ss_base_model_version": version, "modelspec.architecture": arch,
            "modelspec.sai_model_spec": "1.0.0"}
    if conv_rank is not None:
        meta["ss_network_args"] = json.dumps({"conv_dim": str(conv_rank), "conv_alpha": str(conv_rank)})
    return sd, meta


def write_set(out_dir: str, model: str = "sdxl", count: int = 3, rank: int = 32, te: bool = True,
              conv_rank: Optional[int] = None, up_scales: Iterable[float] = (0.01, 0.03, 0.003),
              dtype: torch.dtype = torch.float16) -> list:
    """Write ``count`` LoRAs of one family (different seeds and magnitudes); reuse existing files."""
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    scales = list(up_scales)
    mods = module_list(model, te=te, conv=conv_rank is not None)
    paths = []
    for i in range(count):
        tag = f"{model}_r{rank}{'_te' if te else ''}{f'_c{conv_rank}' if conv_rank else ''}_{i}"
        path = os.path.join(out_dir, tag + ".safetensors")
        if not os.path.exists(path):
            sd, meta = synthetic_kohya(model, rank, te=te, conv_rank=conv_rank, seed=i,
                                       up_scale=scales[i % len(scales)], dtype=dtype, modules=mods)
            save_file(sd, path + ".part", metadata=meta)
            os.replace(path + ".part", path)
        paths.append(path)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="sdxl", choices=["sd15", "sdxl", "flux"])
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--te", action="store_true")
    ap.add_argument("--conv-rank", type=int)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--up-scale", type=float, default=0.01)
    ap.add_argument("-o", "--output")
    ap.add_argument("--list", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(1)
    if a.list:
        for model in ("sd15", "sdxl", "flux"):
            for te in (False, True):
                mods = module_list(model, te=te)
                print(f"{model:5s} te={te!s:5s} modules={len(mods)}")
        return
    from safetensors.torch import save_file

    sd, meta = synthetic_kohya(a.model, a.rank, te=a.te, conv_rank=a.conv_rank, seed=a.seed, up_scale=a.up_scale)
    save_file(sd, a.output, metadata=meta)
    print(f"wrote {a.output}: {sum(k.endswith('lora_down.weight') for k in sd)} modules")


if __name__ == "__main__":
    main()
