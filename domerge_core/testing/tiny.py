"""Tiny offline diffusers pipelines and random LoRAs for them (tests, demos, benchmarks).

Everything is built from configs with fixed seeds: no download, no Hub cache. The CLIP tokenizer is
a byte-level BPE vocabulary (514 tokens, no merges) written to a temporary folder.

Two pipelines:
- :func:`tiny_sd1` — SD1-style ``StableDiffusionPipeline`` (UNet ~1 M params, 1 CLIP encoder);
  its kohya names are plain diffusers paths (``lora_unet_down_blocks_1_attentions_0_...``).
- :func:`tiny_sdxl` — SDXL-style ``StableDiffusionXLPipeline`` (2 CLIP encoders, ``layers_per_block=2``
  like real SDXL, so kohya files use SGM names ``lora_unet_input_blocks_4_1_...``).

Random LoRAs (:func:`random_lora`) are in-memory :class:`~domerge_core.lora.Lora` objects with
canonical keys (``unet.<path>``, ``text_encoder.text_model.<path>``); :func:`write_kohya` and
:func:`write_peft` write them as real safetensors files *without* going through
``domerge_core.formats`` — the fixtures must not share code with the readers they test.

diffusers / transformers are imported inside the functions: ``domerge_core`` imports without them.
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch

from ..lora import Lora, LoraModule

# kohya sd-scripts (networks/lora.py) target classes
UNET_ATTN_PARENTS = ("Transformer2DModel",)                          # Linear + 1x1 conv inside
UNET_CONV_PARENTS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")  # LoCon (conv_dim)
TE_PARENTS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP")
# diffusers dreambooth default targets
ATTN_ONLY = ("to_q", "to_k", "to_v", "to_out.0")

PROMPT = "a photo of a cat"


def _quiet_transformers() -> None:
    try:  # transformers 5 prints a "LOAD REPORT" table when peft injects text-encoder LoRA
        from transformers.utils import logging as tlog
        tlog.set_verbosity_error()
    except Exception:  # pragma: no cover
        pass
    try:
        from diffusers.utils import logging as dlog
        dlog.set_verbosity_error()
    except Exception:  # pragma: no cover
        pass


# ----------------------------------------------------------------------------------------------
# tokenizer and pipelines
# ----------------------------------------------------------------------------------------------
def _byte_chars() -> List[str]:
    """GPT-2/CLIP ``bytes_to_unicode`` table: 256 printable stand-ins for the 256 byte values."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def make_tokenizer(folder: Optional[str] = None):
    """An offline CLIPTokenizer: every byte is a token (514 tokens incl. start/end)."""
    from transformers import CLIPTokenizer

    folder = folder or tempfile.mkdtemp(prefix="domerge_tok_")
    d = os.path.join(folder, "tokenizer")
    os.makedirs(d, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    chars = _byte_chars()
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    with open(os.path.join(d, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f)
    with open(os.path.join(d, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
    # model_max_length must be set: the default is a huge sentinel the pipeline would pad to.
    return CLIPTokenizer.from_pretrained(d, model_max_length=77, local_files_only=True)


def _clip_config(hidden: int = 32, layers: int = 2, projection: Optional[int] = None):
    from transformers import CLIPTextConfig

    kw = dict(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=hidden, intermediate_size=2 * hidden,
              num_attention_heads=4, num_hidden_layers=layers, vocab_size=600, max_position_embeddings=77,
              layer_norm_eps=1e-5, hidden_act="gelu")
    if projection is not None:
        kw["projection_dim"] = projection
    return CLIPTextConfig(**kw)


def _tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         norm_num_groups=32, sample_size=64)


def tiny_sd1(seed: int = 0, folder: Optional[str] = None):
    """SD1-style pipeline: attention only in the low-resolution block (3x faster), 1x1 proj_in/out."""
    _quiet_transformers()
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32)
    vae = _tiny_vae()
    text_encoder = CLIPTextModel(_clip_config())
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=make_tokenizer(folder),
                                   scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sdxl(seed: int = 0, folder: Optional[str] = None):
    """SDXL-style pipeline: two CLIP encoders, linear proj_in/out, ``layers_per_block=2`` (SGM indices
    then follow real SDXL's rule)."""
    _quiet_transformers()
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + 32,   # 6 time ids * 8 + pooled te2 width
        cross_attention_dim=64,                             # te1 width + te2 width
        norm_num_groups=32)
    vae = _tiny_vae()
    te_cfg = _clip_config(projection=32)
    tok = make_tokenizer(folder)
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, steps_offset=1,
                                   beta_schedule="scaled_linear", timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(unet=unet, vae=vae, text_encoder=CLIPTextModel(te_cfg),
                                     text_encoder_2=CLIPTextModelWithProjection(te_cfg), tokenizer=tok,
                                     tokenizer_2=tok, scheduler=sched, force_zeros_for_empty_prompt=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, seed: int = 0, steps: int = 2, size: int = 64, prompt: str = PROMPT):
    """A deterministic image (numpy HxWx3 float) — the pipeline's output for LoRA comparisons."""
    g = torch.Generator("cpu").manual_seed(seed)
    return pipe(prompt, num_inference_steps=steps, height=size, width=size, guidance_scale=5.0,
                generator=g, output_type="np").images[0]


def components(pipe) -> Dict[str, torch.nn.Module]:
    """Component name -> model, for the LoRA-able parts of a pipeline."""
    out = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    if getattr(pipe, "text_encoder_2", None) is not None:
        out["text_encoder_2"] = pipe.text_encoder_2
    return out


def is_sdxl(pipe) -> bool:
    return getattr(pipe, "text_encoder_2", None) is not None


# ----------------------------------------------------------------------------------------------
# canonical key <-> the pipeline's own modules / parameters
# ----------------------------------------------------------------------------------------------
def _model_path(model: torch.nn.Module, component: str, path: str) -> str:
    """Canonical CLIP keys say ``text_model.encoder...``; transformers 5 models have no ``text_model``."""
    if component.startswith("text_encoder") and path.startswith("text_model.") \
            and not hasattr(model, "text_model"):
        return path[len("text_model."):]
    return path


def weight_of(pipe, key: str) -> Tuple[str, str]:
    """(component, parameter name in that component's state_dict) of the weight a canonical key patches."""
    component, path = key.split(".", 1)
    model = components(pipe)[component]
    return component, _model_path(model, component, path) + ".weight"


def module_of(pipe, key: str) -> torch.nn.Module:
    component, path = key.split(".", 1)
    model = components(pipe)[component]
    return model.get_submodule(_model_path(model, component, path))


def snapshot(pipe) -> Dict[str, Dict[str, torch.Tensor]]:
    """A copy of every component's weights (to restore or to diff against)."""
    return {c: {k: v.detach().clone() for k, v in m.state_dict().items()} for c, m in components(pipe).items()}


def restore(pipe, snap) -> None:
    for c, m in components(pipe).items():
        m.load_state_dict(snap[c])


def fused_deltas(pipe, path: str, lora_scale: float = 1.0) -> Dict[str, Dict[str, torch.Tensor]]:
    """What diffusers applies: ``load_lora_weights(path)`` + ``fuse_lora`` + unload, diffed against the
    weights before, per component and parameter name (only changed parameters). The pipeline is
    restored exactly afterwards."""
    _quiet_transformers()
    before = snapshot(pipe)
    try:
        pipe.load_lora_weights(path, adapter_name="probe")
        pipe.fuse_lora(lora_scale=lora_scale, adapter_names=["probe"])
        pipe.unload_lora_weights()        # keeps the fused weights, removes the LoRA layers
        after = snapshot(pipe)
    finally:
        try:
            pipe.unload_lora_weights()
        except Exception:  # pragma: no cover
            pass
        restore(pipe, before)
    out: Dict[str, Dict[str, torch.Tensor]] = {}
    for c, sd in after.items():
        for k, v in sd.items():
            d = v.double() - before[c][k].double()
            if torch.count_nonzero(d):
                out.setdefault(c, {})[k] = d
    return out


def image_with_lora(pipe, path: str, seed: int = 0, **kw):
    """The pipeline's image with the LoRA file loaded (unloaded afterwards)."""
    _quiet_transformers()
    pipe.load_lora_weights(path, adapter_name="img")
    try:
        return generate(pipe, seed=seed, **kw)
    finally:
        pipe.unload_lora_weights()


# ----------------------------------------------------------------------------------------------
# random LoRAs
# ----------------------------------------------------------------------------------------------
def _kohya_targets(root: torch.nn.Module, parents: Sequence[str], conv3x3: bool) -> Iterator[Tuple[str, torch.nn.Module]]:
    """(module path, module) the way sd-scripts' ``create_modules`` picks them."""
    seen = set()
    for name, mod in root.named_modules():
        if mod.__class__.__name__ not in parents:
            continue
        for cname, child in mod.named_modules():
            path = f"{name}.{cname}" if cname else name
            if path in seen:
                continue
            if isinstance(child, torch.nn.Linear) or (
                    isinstance(child, torch.nn.Conv2d) and (child.kernel_size == (1, 1) or conv3x3)):
                seen.add(path)
                yield path, child


def lora_targets(pipe, *, targets: str = "kohya", conv3x3: bool = True,
                 text_encoders: bool = True) -> List[Tuple[str, torch.nn.Module]]:
    """(canonical key, module) of the modules a LoRA would patch.

    ``targets="kohya"``: kohya's set (attention-block Linear/1x1 conv, LoCon 3x3 convs when ``conv3x3``,
    CLIP attention + MLP); ``"attn"``: diffusers dreambooth's ``to_q/to_k/to_v/to_out.0`` only.
    """
    out = []
    for comp, model in components(pipe).items():
        is_unet = comp == "unet"
        if not is_unet and not text_encoders:
            continue
        if targets == "attn" and is_unet:
            found = [(n, m) for n, m in model.named_modules()
                     if isinstance(m, torch.nn.Linear) and any(n.endswith("." + t) for t in ATTN_ONLY)]
        else:
            parents = (UNET_ATTN_PARENTS + (UNET_CONV_PARENTS if conv3x3 else ())) if is_unet else TE_PARENTS
            found = list(_kohya_targets(model, parents, conv3x3=conv3x3 and is_unet))
        for path, mod in found:
            if not is_unet and not path.startswith("text_model."):
                path = "text_model." + path     # canonical CLIP names carry text_model.
            out.append((f"{comp}.{path}", mod))
    return out


def random_factors(module: torch.nn.Module, rank: int, gen: torch.Generator, std: float = 0.5
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(up, down) shaped like kohya's: Linear up (out, r), down (r, in); conv up (out, r, 1, 1),
    down (r, in, kh, kw). Scaled so that one module's update is of the order of its weight."""
    if isinstance(module, torch.nn.Conv2d):
        kh, kw = module.kernel_size
        fan_in = module.in_channels * kh * kw
        down = torch.randn(rank, module.in_channels, kh, kw, generator=gen) * std / fan_in ** 0.5
        up = torch.randn(module.out_channels, rank, 1, 1, generator=gen) * std
    else:
        down = torch.randn(rank, module.in_features, generator=gen) * std / module.in_features ** 0.5
        up = torch.randn(module.out_features, rank, generator=gen) * std
    return up, down


def random_lora(pipe, *, rank: int = 4, alpha: Optional[float] = None, conv_rank: Optional[int] = None,
                conv_alpha: Optional[float] = None, seed: int = 0, targets: str = "kohya", conv3x3: bool = True,
                text_encoders: bool = True, ranks: Optional[Dict[str, int]] = None,
                alphas: Optional[Dict[str, float]] = None, dtype: torch.dtype = torch.float32,
                std: float = 0.5) -> Lora:
    """A random LoRA for ``pipe`` with canonical keys; module scale = alpha / rank (alpha defaults to rank).

    ``conv_rank``/``conv_alpha`` apply to 3x3 convs (LoCon); ``ranks``/``alphas`` override per canonical key.
    Factors are stored in ``dtype``; the scale is kept apart (``LoraModule.scale``).
    """
    gen = torch.Generator().manual_seed(seed)
    conv_rank = conv_rank or rank
    modules: Dict[str, LoraModule] = {}
    for key, mod in lora_targets(pipe, targets=targets, conv3x3=conv3x3, text_encoders=text_encoders):
        big_kernel = isinstance(mod, torch.nn.Conv2d) and mod.kernel_size != (1, 1)
        r = (ranks or {}).get(key, conv_rank if big_kernel else rank)
        a = (alphas or {}).get(key, (conv_alpha if big_kernel else alpha))
        a = float(r if a is None else a)
        up, down = random_factors(mod, r, gen, std=std)
        kernel = tuple(mod.kernel_size) if isinstance(mod, torch.nn.Conv2d) else None
        modules[key] = LoraModule.from_tensors(key, up.to(dtype), down.to(dtype), a / r, kernel_size=kernel)
    base = "sdxl" if is_sdxl(pipe) else "sd1"
    return Lora(modules=modules, format="merged", source=f"<random {base} lora seed={seed}>", dtype=dtype,
                base_model=base, layout={"format": "kohya"})


# ----------------------------------------------------------------------------------------------
# fixture writers (independent of domerge_core.formats)
# ----------------------------------------------------------------------------------------------
def _up_down(m: LoraModule) -> Tuple[torch.Tensor, torch.Tensor]:
    """Factors in their file shapes (conv: up (out, r, 1, 1), down (r, in, kh, kw))."""
    up, down = m.loader()
    if m.kind == "conv":
        kh, kw = m.kernel_size
        up = up.reshape(m.out_features, m.rank, 1, 1)
        down = down.reshape(m.rank, m.in_features // (kh * kw), kh, kw)
    return up.contiguous(), down.contiguous()


def kohya_state_dict(lora: Lora, *, sgm: bool = False, layers_per_block: int = 2,
                     alpha_dtype: torch.dtype = torch.float32) -> Dict[str, torch.Tensor]:
    """kohya/A1111 names with the module's own alpha (= scale·rank): ``lora_unet_…``, ``lora_te_…``
    (SD1) or ``lora_te1_…``/``lora_te2_…`` (SDXL); ``sgm=True`` writes SDXL UNet names in SGM layout."""
    from ..formats.canonical import diffusers_to_sgm

    two_te = any(k.startswith("text_encoder_2.") for k in lora.modules)
    prefix = {"unet": "lora_unet", "text_encoder": "lora_te1" if two_te else "lora_te",
              "text_encoder_2": "lora_te2"}
    sd: Dict[str, torch.Tensor] = {}
    for m in lora:
        comp, path = m.key.split(".", 1)
        if comp == "unet" and sgm:
            path = diffusers_to_sgm(path, layers_per_block)
        name = prefix[comp] + "_" + path.replace(".", "_")
        up, down = _up_down(m)
        sd[name + ".lora_down.weight"] = down
        sd[name + ".lora_up.weight"] = up
        sd[name + ".alpha"] = torch.tensor(m.scale * m.rank, dtype=alpha_dtype)
    return sd


def write_kohya(lora: Lora, path: str, *, sgm: bool = False, metadata: Optional[Dict[str, str]] = None,
                **kw) -> str:
    from safetensors.torch import save_file

    md = {"ss_network_module": "networks.lora"}
    md.update(metadata or {})
    save_file(kohya_state_dict(lora, sgm=sgm, **kw), path, metadata=md)
    return path


def peft_state_dict(lora: Lora, *, bake_scale: bool = True, prefix: Optional[str] = None
                    ) -> Dict[str, torch.Tensor]:
    """diffusers/PEFT names ``<component>.<path>.lora_A.weight`` / ``lora_B.weight``. With ``bake_scale``
    the scale is multiplied into lora_B (no alpha needed); otherwise the factors are raw and the scale must
    come from ``lora_adapter_metadata`` / ``adapter_config.json``. ``prefix`` replaces the component
    (e.g. ``"base_model.model"`` for a PEFT adapter of one model)."""
    sd: Dict[str, torch.Tensor] = {}
    for m in lora:
        comp, path = m.key.split(".", 1)
        base = f"{prefix if prefix is not None else comp}.{path}"
        up, down = _up_down(m)
        if bake_scale:
            up = (up.double() * m.scale).to(up.dtype)
        sd[base + ".lora_A.weight"] = down
        sd[base + ".lora_B.weight"] = up.contiguous()
    return sd


def adapter_metadata(lora: Lora, *, use_rslora: bool = False) -> Dict[str, object]:
    """``lora_adapter_metadata`` content (flat ``<component>.<field>``) reproducing each module's scale
    through r / lora_alpha and rank_pattern / alpha_pattern, like diffusers' save_lora_weights writes."""
    out: Dict[str, object] = {}
    by_comp: Dict[str, List[LoraModule]] = {}
    for m in lora:
        by_comp.setdefault(m.key.split(".", 1)[0], []).append(m)
    for comp, mods in by_comp.items():
        r = max(set(m.rank for m in mods), key=[m.rank for m in mods].count)
        alpha_of = (lambda m: m.scale * m.rank ** 0.5) if use_rslora else (lambda m: m.scale * m.rank)
        alphas = [alpha_of(m) for m in mods]
        a = max(set(alphas), key=alphas.count)
        out[f"{comp}.r"] = r
        out[f"{comp}.lora_alpha"] = a
        out[f"{comp}.use_rslora"] = use_rslora
        out[f"{comp}.rank_pattern"] = {m.key.split(".", 1)[1]: m.rank for m in mods if m.rank != r}
        out[f"{comp}.alpha_pattern"] = {m.key.split(".", 1)[1]: alpha_of(m) for m in mods if alpha_of(m) != a}
        out[f"{comp}.target_modules"] = sorted({m.key.rsplit(".", 1)[-1] for m in mods})
    return out


def write_peft(lora: Lora, path: str, *, scale: str = "bake", metadata: Optional[Dict[str, str]] = None,
               use_rslora: bool = False, prefix: Optional[str] = None) -> str:
    """Write ``lora`` in diffusers/PEFT layout. ``scale``: ``"bake"`` (into lora_B), ``"metadata"``
    (``lora_adapter_metadata`` in the header) or ``"config"`` (an ``adapter_config.json`` beside the file,
    for a single-component LoRA)."""
    from safetensors.torch import save_file

    md = {"format": "pt"}
    md.update(metadata or {})
    sd = peft_state_dict(lora, bake_scale=(scale == "bake"), prefix=prefix)
    if scale == "metadata":
        md["lora_adapter_metadata"] = json.dumps(adapter_metadata(lora, use_rslora=use_rslora), sort_keys=True)
    elif scale == "config":
        meta = adapter_metadata(lora, use_rslora=use_rslora)
        comps = {k.split(".", 1)[0] for k in meta}
        if len(comps) != 1:
            raise ValueError("scale='config' needs a single-component LoRA")
        (comp,) = comps
        cfg = {k.split(".", 1)[1]: v for k, v in meta.items()}
        cfg.update({"peft_type": "LORA", "task_type": None, "fan_in_fan_out": False})
        with open(os.path.join(os.path.dirname(os.path.abspath(path)), "adapter_config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
    elif scale != "bake":
        raise ValueError(f"scale must be 'bake', 'metadata' or 'config', not {scale!r}")
    save_file(sd, path, metadata=md)
    return path


def iter_deltas(lora: Lora) -> Iterable[Tuple[str, torch.Tensor]]:
    """(canonical key, dense float64 update in the weight's shape) — reference values for tests."""
    for m in lora:
        yield m.key, m.delta(torch.float64).reshape(m.weight_shape)
