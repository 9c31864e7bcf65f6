"""One key space for every format: canonical keys ``<component>.<diffusers module path>``.

- kohya names (``lora_unet_down_blocks_0_…``) lose their dots; :func:`kohya_path` puts them back
  with a vocabulary of the identifiers that contain underscores (``down_blocks``, ``to_q``, ``q_proj``…).
- SDXL kohya files name the UNet in SGM/LDM layout (``input_blocks.4.1.…``); :func:`sgm_to_diffusers`
  maps them to diffusers paths and :func:`diffusers_to_sgm` back (writers keep the first input's naming).
  diffusers does the same in ``_maybe_map_sgm_blocks_to_diffusers``; diffusers is an optional extra,
  so the rule lives here and ``tests/test_align.py`` checks it agrees with diffusers' converter.
- kohya/BFL Flux names (fused ``img_attn_qkv``, ``linear1``) map to diffusers' split q/k/v
  (:func:`flux_targets`), like diffusers' ``_convert_kohya_flux_lora_to_diffusers``.
- SD3/SD3.5 MMDiT names (ComfyUI-native / sd-scripts ``joint_blocks.N.{x_block,context_block}.…``,
  fused ``attn.qkv``) map to diffusers' ``SD3Transformer2DModel`` paths with the row slices of
  ComfyUI's ``mmdit_to_diffusers`` (:func:`mmdit_targets`).
- CLIP paths are accepted with or without ``text_model.``; canonical keys carry it.

(Whether several inputs fit one base model is the engine's rule: `engine.plan.check_compatible`.)
"""
from __future__ import annotations

import functools
import re
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

# Which rows of a file's up factor (of a fused weight) a canonical module takes, in order: ordered
# (start, end) ranges, so a split is one range per part and a swap of halves is two ranges
# ((h, 2h), (0, h)); None: all rows, in order. Only the up factor is reordered (down is shared).
Rows = Optional[Tuple[Tuple[int, int], ...]]


def rows_count(rows: Rows, whole: int) -> int:
    """How many rows a selection takes (``whole``: the fused weight's row count, for None)."""
    return whole if rows is None else sum(b - a for a, b in rows)


def row_index(rows: Rows, whole: int) -> List[int]:
    """The fused weight's row of each row of the selection (tests, the aligner's checks)."""
    return list(range(whole)) if rows is None else [i for a, b in rows for i in range(a, b)]


def swapped_halves(n: int) -> Rows:
    """ComfyUI's / diffusers' ``swap_scale_shift``: the second half of the rows, then the first."""
    return ((n // 2, n), (0, n // 2))


def take_rows(t, rows: Rows):
    """The selected rows of tensor ``t`` (dim 0), in order: a view for one range, a copy for several."""
    if rows is None:
        return t
    if len(rows) == 1:
        a, b = rows[0]
        return t.narrow(0, a, b - a)
    import torch
    return torch.cat([t.narrow(0, a, b - a) for a, b in rows])


def stack_rows(parts: Sequence[Tuple[Rows, "object"]], whole: int, what: str = "fused module"):
    """The inverse of :func:`take_rows` over the parts of a fused weight: ``[(rows, tensor)]`` put
    back at their rows of a ``whole``-row tensor. Raises ValueError unless the parts cover every row
    exactly once."""
    seen = [False] * whole
    first = parts[0][1]
    out = first.new_empty((whole, *first.shape[1:]))
    for rows, t in parts:
        at = 0
        for a, b in ((0, whole),) if rows is None else rows:
            if not 0 <= a <= b <= whole or any(seen[a:b]):
                raise ValueError(f"the parts of the {what} overlap or exceed its {whole} rows")
            seen[a:b] = [True] * (b - a)
            out[a:b] = t[at:at + b - a]
            at += b - a
        if at != t.shape[0]:
            raise ValueError(f"a part of the {what} has {t.shape[0]} rows, its mapping takes {at}")
    if not all(seen):
        raise ValueError(f"the parts of the {what} do not cover its {whole} rows")
    return out


# identifiers with underscores that appear in module paths (longest match first when re-dotting)
_COMPOUNDS = """
down_blocks up_blocks mid_block transformer_blocks single_transformer_blocks to_q to_k to_v to_out
proj_in proj_out time_emb_proj conv_shortcut conv_in conv_out conv_norm_out time_embedding linear_1 linear_2
add_embedding add_q_proj add_k_proj add_v_proj to_add_out ff_context norm1_context norm_out proj_mlp
text_model self_attn q_proj k_proj v_proj out_proj final_layer_norm token_embedding position_embedding
input_blocks middle_block output_blocks in_layers out_layers emb_layers skip_connection time_embed label_emb
double_blocks single_blocks img_attn txt_attn img_mlp txt_mlp img_mod txt_mod
img_in txt_in time_in vector_in guidance_in in_layer out_layer
joint_blocks x_block context_block adaLN_modulation x_embedder context_embedder t_embedder y_embedder
final_layer time_text_embed timestep_embedder guidance_embedder text_embedder time_proj pos_embed
embed_tokens gate_proj up_proj down_proj o_proj lm_head
""".split()
_COMPOUND_TOKENS = sorted((c.split("_") for c in _COMPOUNDS), key=len, reverse=True)
_BY_FIRST: Dict[str, List[List[str]]] = {}          # first token -> compounds, longest first
for _c in _COMPOUND_TOKENS:
    _BY_FIRST.setdefault(_c[0], []).append(_c)

# The one component list: the first segment of a canonical key.
TE_COMPONENTS = ("text_encoder", "text_encoder_2", "text_encoder_3")           # diffusers text encoders
DENOISER_COMPONENTS = ("unet", "transformer", "prior")                         # diffusers denoisers
PIPELINE_COMPONENTS = DENOISER_COMPONENTS + TE_COMPONENTS                      # diffusers pipeline names
NATIVE_COMPONENTS = ("diffusion_model", "text_encoders")                       # ComfyUI-native keys
COMPONENTS = PIPELINE_COMPONENTS + ("model",) + NATIVE_COMPONENTS              # "model": generic PEFT
TEXT_ENCODER_COMPONENTS = TE_COMPONENTS + ("text_encoders",)


def is_text_encoder(key: str) -> bool:
    """Whether a canonical module key belongs to a text encoder (it merges at the CLIP strength)."""
    return key.split(".", 1)[0] in TEXT_ENCODER_COMPONENTS


@functools.lru_cache(maxsize=1 << 16)
def kohya_path(flat: str) -> str:
    """``down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q`` -> ``down_blocks.0.….attn1.to_q``."""
    toks = flat.split("_")
    out: List[str] = []
    i = 0
    while i < len(toks):
        for comp in _BY_FIRST.get(toks[i], ()):
            n = len(comp)
            if toks[i:i + n] == comp:
                out.append("_".join(comp))
                i += n
                break
        else:
            out.append(toks[i])
            i += 1
    path = ".".join(out)
    # diffusers: attention output projection is to_out.0 (kohya: to_out_0 -> "to_out.0" already)
    return path


# ----------------------------------------------------------------------------------------------
# SDXL SGM/LDM <-> diffusers UNet paths
# ----------------------------------------------------------------------------------------------
_RESNET_SGM_TO_DM = {"in_layers.0": "norm1", "in_layers.2": "conv1", "out_layers.0": "norm2",
                     "out_layers.3": "conv2", "emb_layers.1": "time_emb_proj", "skip_connection": "conv_shortcut"}
_RESNET_DM_TO_SGM = {v: k for k, v in _RESNET_SGM_TO_DM.items()}
_SGM_HEAD = re.compile(r"^(input_blocks|middle_block|output_blocks)\.|^(time_embed|label_emb)\.|^out\.2$")
# SGM modules outside the block structure (as diffusers' _convert_unet_lora_key maps them)
_SGM_TOP = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
            "label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2",
            "out.2": "conv_out"}
_SGM_TOP_INV = {v: k for k, v in _SGM_TOP.items()}


def is_sgm_path(path: str) -> bool:
    return bool(_SGM_HEAD.match(path))


def _resnet_rest(rest: List[str], table: Dict[str, str]) -> List[str]:
    s = ".".join(rest)
    for k, v in table.items():
        if s == k or s.startswith(k + "."):
            return (v + s[len(k):]).split(".")
    return rest


def sgm_to_diffusers(path: str, layers_per_block: int = 2) -> str:
    """SGM UNet module path -> diffusers path (SD1/SD2/SDXL share the rule; SDXL uses lpb = 2).

    ``input_blocks.n.{0|1}`` -> ``down_blocks.b.{resnets|attentions}.j`` (or ``downsamplers.0.conv`` for
    ``.0.op``), ``middle_block.{0,1,2}`` -> ``mid_block.{resnets.0, attentions.0, resnets.1}``,
    ``output_blocks.n.{0|1|2}`` -> ``up_blocks.b.{resnets|attentions|upsamplers}.j``.
    """
    if path in _SGM_TOP:
        return _SGM_TOP[path]
    p = path.split(".")
    lpb1 = layers_per_block + 1
    if p[0] == "input_blocks":
        n, sub, rest = int(p[1]), p[2], p[3:]
        if n == 0:
            return "conv_in" + ("." + ".".join(rest) if rest else "")
        b, j = (n - 1) // lpb1, (n - 1) % lpb1
        if j == layers_per_block:          # the downsampler's own block
            return ".".join(["down_blocks", str(n // lpb1 - 1), "downsamplers", "0", "conv"] + rest[1:])
        if sub == "0":
            return ".".join(["down_blocks", str(b), "resnets", str(j)] + _resnet_rest(rest, _RESNET_SGM_TO_DM))
        return ".".join(["down_blocks", str(b), "attentions", str(j)] + rest)
    if p[0] == "middle_block":
        i, rest = int(p[1]), p[2:]
        if i == 1:
            return ".".join(["mid_block", "attentions", "0"] + rest)
        return ".".join(["mid_block", "resnets", str(i // 2)] + _resnet_rest(rest, _RESNET_SGM_TO_DM))
    if p[0] == "output_blocks":
        n, sub, rest = int(p[1]), int(p[2]), p[3:]
        b, j = n // lpb1, n % lpb1
        if sub == 0:
            return ".".join(["up_blocks", str(b), "resnets", str(j)] + _resnet_rest(rest, _RESNET_SGM_TO_DM))
        if rest and rest[0] == "conv" and len(rest) <= 2 and j == layers_per_block:
            return ".".join(["up_blocks", str(b), "upsamplers", "0"] + rest)
        return ".".join(["up_blocks", str(b), "attentions", str(j)] + rest)
    return path


def diffusers_to_sgm(path: str, layers_per_block: int = 2) -> str:
    """diffusers UNet module path -> SGM path (inverse of :func:`sgm_to_diffusers`)."""
    if path in _SGM_TOP_INV:
        return _SGM_TOP_INV[path]
    p = path.split(".")
    lpb1 = layers_per_block + 1
    if p[0] == "down_blocks":
        b, kind, j, rest = int(p[1]), p[2], int(p[3]), p[4:]
        if kind == "downsamplers":
            return ".".join(["input_blocks", str((b + 1) * lpb1), "0", "op"] + rest[1:])
        if kind == "resnets":
            return ".".join(["input_blocks", str(b * lpb1 + j + 1), "0"] + _resnet_rest(rest, _RESNET_DM_TO_SGM))
        return ".".join(["input_blocks", str(b * lpb1 + j + 1), "1"] + rest)
    if p[0] == "mid_block":
        kind, j, rest = p[1], int(p[2]), p[3:]
        if kind == "attentions":
            return ".".join(["middle_block", "1"] + rest)
        return ".".join(["middle_block", str(2 * j)] + _resnet_rest(rest, _RESNET_DM_TO_SGM))
    if p[0] == "up_blocks":
        b, kind, j, rest = int(p[1]), p[2], int(p[3]), p[4:]
        if kind == "upsamplers":
            return ".".join(["output_blocks", str(b * lpb1 + layers_per_block), "2"] + rest)
        if kind == "resnets":
            return ".".join(["output_blocks", str(b * lpb1 + j), "0"] + _resnet_rest(rest, _RESNET_DM_TO_SGM))
        return ".".join(["output_blocks", str(b * lpb1 + j), "1"] + rest)
    if p[0] == "conv_in":
        return ".".join(["input_blocks", "0", "0"] + p[1:])
    return path


# ----------------------------------------------------------------------------------------------
# text encoders
# ----------------------------------------------------------------------------------------------
def clip_path(path: str) -> str:
    """Bare transformers-5 CLIP paths (``encoder.layers.0…``) get the canonical ``text_model.`` prefix.
    T5 paths (``encoder.block.…``) are left alone."""
    if path.startswith(("encoder.layers.", "embeddings.", "final_layer_norm")):
        return "text_model." + path
    return path


def canonical(component: str, path: str, *, layers_per_block: int = 2) -> str:
    """Canonical key for a module path of ``component`` in any of the naming schemes we accept."""
    if component == "unet" and is_sgm_path(path):
        path = sgm_to_diffusers(path, layers_per_block)
    elif component in TE_COMPONENTS:
        path = clip_path(path)
    return f"{component}.{path}"


# ----------------------------------------------------------------------------------------------
# Flux (kohya / BFL names, fused qkv) -> diffusers FluxTransformer2DModel
# ----------------------------------------------------------------------------------------------
_FLUX_DOUBLE = {
    "img_attn.qkv": ["attn.to_q", "attn.to_k", "attn.to_v"],
    "txt_attn.qkv": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
    "img_attn.proj": ["attn.to_out.0"], "txt_attn.proj": ["attn.to_add_out"],
    "img_mlp.0": ["ff.net.0.proj"], "img_mlp.2": ["ff.net.2"],
    "txt_mlp.0": ["ff_context.net.0.proj"], "txt_mlp.2": ["ff_context.net.2"],
    "img_mod.lin": ["norm1.linear"], "txt_mod.lin": ["norm1_context.linear"],
}
_FLUX_SINGLE = {
    "linear1": ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"],
    "linear2": ["proj_out"], "modulation.lin": ["norm.linear"],
}
_FLUX_RE = re.compile(r"^(double_blocks|single_blocks)\.(\d+)\.(.+)$")


def is_flux_path(path: str) -> bool:
    return bool(_FLUX_RE.match(path))


def flux_targets(path: str, out_features: int) -> Optional[List[Tuple[str, Rows]]]:
    """BFL Flux block module path -> [(diffusers key, rows of the up factor)].

    Fused qkv splits in three equal parts; single-block ``linear1`` is q, k, v (h each) + mlp (4h),
    so h = out/7. Returns None for a path that is not a known Flux module.
    """
    m = _FLUX_RE.match(path)
    if not m:
        return None
    kind, i, sub = m.groups()
    table = _FLUX_DOUBLE if kind == "double_blocks" else _FLUX_SINGLE
    targets = table.get(sub)
    if targets is None:
        return None
    block = f"transformer.{'transformer_blocks' if kind == 'double_blocks' else 'single_transformer_blocks'}.{i}"
    if len(targets) == 1:
        return [(f"{block}.{targets[0]}", None)]
    if len(targets) == 3:
        if out_features % 3:
            return None
        h = out_features // 3
        sizes = [h, h, h]
    else:
        if out_features % 7:
            return None
        h = out_features // 7
        sizes = [h, h, h, 4 * h]
    out, start = [], 0
    for t, s in zip(targets, sizes):
        out.append((f"{block}.{t}", ((start, start + s),)))
        start += s
    return out


# Flux's modules outside the blocks, as ComfyUI's ``flux_to_diffusers`` and diffusers'
# ``_convert_kohya_flux_lora_to_diffusers`` name them. Mapped only in a file that is Flux (see
# :func:`file_hint`): ``img_in``/``txt_in``/``final_layer.linear`` are other models' names too
# (Qwen-Image's diffusers ``img_in``/``txt_in``, Lumina's ``final_layer.linear`` = ``norm_out.linear_2``).
FLUX_TOP = {
    "img_in": "x_embedder", "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out",
}
# shift, scale (BFL / SD3 native) <-> scale, shift (diffusers AdaLayerNormContinuous): swap_scale_shift
FINAL_MOD = "final_layer.adaLN_modulation.1"
_FLUX_MARK = re.compile(r"(?:^|[._])(?:double_blocks|single_blocks)[._]\d+[._]"
                        r"|(?:^|[._])(?:time_in|vector_in|guidance_in)[._](?:in|out)_layer")
_SD3_MARK = re.compile(r"(?:^|[._])joint_blocks[._]\d+[._]")


def file_hint(names: Iterable[str]) -> Optional[str]:
    """"flux" when a file's module (or checkpoint) names have BFL Flux blocks or embedders
    (``double_blocks``/``single_blocks``/``time_in``/``vector_in``/``guidance_in``), "sd3" for SD3
    ``joint_blocks``, else None: decides per file whether Flux's/SD3's modules outside the blocks
    (``img_in``, ``final_layer.adaLN_modulation.1``…) take their diffusers names.

    HunyuanVideo and Chroma files (BFL-style blocks too) get the same hint; for them the mapped names
    are right as well (diffusers' HunyuanVideo / Chroma use the same ``time_text_embed``, ``norm_out``
    with swapped halves, ``proj_out``, ``x_embedder``/``context_embedder``; HunyuanVideo's
    ``img_in.proj`` / ``txt_in.…`` are other paths and stay as they are)."""
    hint = None
    for n in names:
        if _FLUX_MARK.search(n):
            return "flux"
        if hint is None and _SD3_MARK.search(n):
            hint = "sd3"
    return hint


def dit_top_targets(path: str, out_features: int, in_features: Optional[int], hint: Optional[str]
                    ) -> Optional[List[Tuple[str, Rows]]]:
    """Flux / SD3 modules outside the blocks in a file of that model (``hint``): ``FLUX_TOP`` for Flux,
    and for both the final modulation (out = 2·in: shift, scale; ``in_features`` None: not known from
    the file, as for OFT) as ``norm_out.linear`` with its halves swapped. None: not such a module (or
    not such a file)."""
    if hint == "flux" and path in FLUX_TOP:
        return [(f"transformer.{FLUX_TOP[path]}", None)]
    if hint in ("flux", "sd3") and path == FINAL_MOD and out_features and out_features % 2 == 0 \
            and (in_features is None or out_features == 2 * in_features):   # None: OFT/GLoRA, shape from the base
        return [("transformer.norm_out.linear", swapped_halves(out_features))]
    return None


def flux_kohya_path(flat: str) -> str:
    """``double_blocks_0_img_attn_qkv`` -> ``double_blocks.0.img_attn.qkv``; ``single_blocks_3_modulation_lin``
    -> ``single_blocks.3.modulation.lin``."""
    path = kohya_path(flat)
    path = re.sub(r"\.(img_attn|txt_attn)\.(qkv|proj)$", r".\1.\2", path)
    path = re.sub(r"\.(img_mod|txt_mod)\.lin$", r".\1.lin", path)
    path = re.sub(r"\.modulation\.lin$", ".modulation.lin", path)
    return path


# ----------------------------------------------------------------------------------------------
# SD3 / SD3.5 MMDiT (ComfyUI-native / sd-scripts names, fused qkv) -> diffusers SD3Transformer2DModel
# ----------------------------------------------------------------------------------------------
# ComfyUI's MMDIT_MAP_BLOCK / mmdit_to_diffusers, LoRA-able (Linear/Conv) weights only: the qk norms
# (``attn.ln_q``/``ln_k`` <-> ``attn.norm_q``…) of SD3.5 are RMSNorm scales, never LoRA targets.
_MMDIT_BLOCK = {
    "x_block.attn.qkv": ["attn.to_q", "attn.to_k", "attn.to_v"],
    "context_block.attn.qkv": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
    "x_block.attn2.qkv": ["attn2.to_q", "attn2.to_k", "attn2.to_v"],          # SD3.5-medium's first blocks
    "x_block.attn.proj": ["attn.to_out.0"], "context_block.attn.proj": ["attn.to_add_out"],
    "x_block.attn2.proj": ["attn2.to_out.0"],
    "x_block.mlp.fc1": ["ff.net.0.proj"], "x_block.mlp.fc2": ["ff.net.2"],
    "context_block.mlp.fc1": ["ff_context.net.0.proj"], "context_block.mlp.fc2": ["ff_context.net.2"],
    "x_block.adaLN_modulation.1": ["norm1.linear"],
    # the last block's context_block is "pre-only" (2 chunks, not 6): ComfyUI maps it to
    # norm1_context.linear with shift/scale halves swapped (mmdit_targets: rows in swapped order)
    "context_block.adaLN_modulation.1": ["norm1_context.linear"],
}
_MMDIT_TOP = {
    "context_embedder": "context_embedder", "x_embedder.proj": "pos_embed.proj",
    "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2",
    "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1",
    "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2",
    "final_layer.linear": "proj_out",
    # final_layer.adaLN_modulation.1 <-> norm_out.linear (swapped halves): dit_top_targets
}
_MMDIT_RE = re.compile(r"^joint_blocks\.(\d+)\.(.+)$")


def is_mmdit_path(path: str) -> bool:
    """A native SD3 MMDiT module path (``joint_blocks.N.…`` or one of the SD3 embedders)."""
    return bool(_MMDIT_RE.match(path)) or path in _MMDIT_TOP


def mmdit_targets(path: str, out_features: int, in_features: Optional[int] = None
                  ) -> Optional[List[Tuple[str, Rows]]]:
    """SD3 MMDiT module path -> [(diffusers key, rows of the up factor)], as ComfyUI's
    ``mmdit_to_diffusers`` slices it: fused ``attn.qkv`` is q, k, v of ``hidden`` rows each; the last
    block's pre-only context ``adaLN_modulation.1`` (2 chunks: out = 2·in, not 6·in) is
    ``norm1_context.linear`` with its shift/scale halves swapped. None for a path that is not a known
    MMDiT module and for a qkv whose rows do not split in three."""
    if path in _MMDIT_TOP:
        return [(f"transformer.{_MMDIT_TOP[path]}", None)]
    m = _MMDIT_RE.match(path)
    if not m:
        return None
    i, sub = m.groups()
    targets = _MMDIT_BLOCK.get(sub)
    if targets is None:
        return None
    block = f"transformer.transformer_blocks.{i}"
    if sub == "context_block.adaLN_modulation.1":
        if in_features and out_features == 2 * in_features:           # pre-only: shift, scale
            return [(f"{block}.{targets[0]}", swapped_halves(out_features))]
        if in_features is None or out_features != 6 * in_features:
            return None
    if len(targets) == 1:
        return [(f"{block}.{targets[0]}", None)]
    if out_features % 3:
        return None
    h = out_features // 3
    return [(f"{block}.{t}", ((j * h, (j + 1) * h),)) for j, t in enumerate(targets)]
