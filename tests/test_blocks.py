"""Block-weight maps: the block of every SD1.5 / SDXL module (checked against ComfyUI's own
diffusers→SGM map), the vector layouts (checked against the Inspire pack's positional rule and
presets), and the model / CLIP strength split."""
from __future__ import annotations

import pytest

from comfy_support import runtime

from domerge_core import InvalidParameterError
from domerge_core.blocks import (LAYOUTS, PRESETS, block_multiplier, block_of, parse_vector,
                                 strength_multiplier)

runtime.import_comfy_library()
import comfy.utils  # noqa: E402

# ComfyUI pops transformer_depth_output from the end (output_blocks.0 last), as in its model configs
SD15 = dict(num_res_blocks=[2, 2, 2, 2], channel_mult=[1, 2, 4, 4], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
            transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], transformer_depth_middle=1)
SDXL = dict(num_res_blocks=[2, 2, 2], channel_mult=[1, 2, 4], transformer_depth=[0, 0, 2, 2, 10, 10],
            transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10], transformer_depth_middle=10)

# The Inspire pack's presets (resources/lbw-preset.txt), as data.
INSPIRE = """SD-NONE:0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0
SD-ALL:1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1
SD-INS:1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0
SD-IND:1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0
SD-INALL:1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0
SD-MIDD:1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0
SD-MIDD0.2:1,0,0,0,0,0,0.2,0.4,0.4,0.2,0,0,0,0,0,0,0
SD-MIDD0.8:1,0,0,0,0,0.5,0.8,0.8,0.4,0,0,0,0,0,0,0,0
SD-MOUT:1,0,0,0,0,0,1,1,1,1,1,1,1,1,0.5,0,0
SD-OUTD:1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0
SD-OUTS:1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1
SD-OUTALL:1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1
SD-ALL0.5:0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5
SD-LyC-NONE:0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0
SD-LyC-ALL:1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1
SD-LyC-INALL:1,1,1,1,1,1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0
SD-LyC-MIDALL:1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0
SD-LyC-OUTALL:1,0,0,0,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1,1,1,1
SDXL-NONE:0,0,0,0,0,0,0,0,0,0,0,0
SDXL-ALL:1,1,1,1,1,1,1,1,1,1,1,1
SDXL-INALL:1,1,1,1,1,0,0,0,0,0,0,0
SDXL-MIDALL:1,0,0,0,0,1,0,0,0,0,0,0
SDXL-OUTALL:1,0,0,0,0,0,1,1,1,1,1,1
SDXL-LyC-NONE:0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0
SDXL-LyC-ALL:1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1
SDXL-LyC-INALL:1,1,1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0
SDXL-LyC-MIDALL:1,0,0,0,0,0,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0
SDXL-LyC-OUTALL:1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1"""


def _sgm_block(comfy_key: str) -> str:
    head, n = comfy_key.split(".")[:2]
    p = {"input_blocks": "IN", "middle_block": "M", "output_blocks": "OUT"}.get(head)
    return p + f"{int(n):02d}" if p else "BASE"          # time_embed, label_emb, out: no block


def _module_map(cfg):
    """canonical key -> SGM block for the modules the model has (ComfyUI's map also lists a
    downsampler / upsampler for the last level, which the models do not have)."""
    out = {}
    last = len(cfg["channel_mult"]) - 1
    for diff, ck in comfy.utils.unet_to_diffusers(dict(cfg)).items():
        if diff.startswith((f"down_blocks.{last}.downsamplers", f"up_blocks.{last}.upsamplers")):
            continue
        if diff.endswith(".weight"):
            out["unet." + diff[: -len(".weight")]] = _sgm_block(ck)
    return out


@pytest.mark.parametrize("cfg", [SD15, SDXL], ids=["sd15", "sdxl"])
def test_block_of_every_unet_module_agrees_with_comfyui_sgm_numbering(cfg):
    mods = _module_map(cfg)
    assert len(mods) > 100
    bad = {k: (block_of(k), v) for k, v in mods.items() if block_of(k) != v}
    assert not bad, list(bad.items())[:5]
    assert block_of("text_encoder.text_model.encoder.layers.0.self_attn.q_proj") == "BASE"
    assert block_of("unet.time_embedding.linear_1") == "BASE"


def _inspire_positions(blocks):
    """The Inspire loader's rule: BASE, then the blocks present in the LoRA, in input/middle/output order."""
    order = {"IN": 0, "M": 1, "OUT": 2}
    def k(b):
        p = b.rstrip("0123456789")
        return order[p], int(b[len(p):])
    return ["BASE"] + sorted(set(blocks), key=k)


def _expand(layout):
    return [x for lab in layout for x in (("M01",) if lab == "MID" else (lab,))]


@pytest.mark.parametrize("cfg,family,n_attn,n_all", [(SD15, "sd1", 17, 27), (SDXL, "sdxl", 12, 21)],
                         ids=["sd15", "sdxl"])
def test_layouts_are_the_inspire_positions_for_lora_and_locon(cfg, family, n_attn, n_all):
    mods = _module_map(cfg)
    attn = [b for k, b in mods.items() if ".attentions." in k]
    locon = [b for k, b in mods.items() if b not in ("IN00", "BASE")]
    assert _inspire_positions(attn) == _expand(LAYOUTS[family][n_attn])
    assert _inspire_positions(locon) == LAYOUTS[family][n_all]


def test_presets_equal_the_inspire_presets():
    for line in INSPIRE.splitlines():
        name, vec = line.split(":")
        assert parse_vector(name) == [float(x) for x in vec.split(",")], name
    assert parse_vector("SD-OUTS:1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1")[12:] == [1.0] * 5
    assert len(PRESETS) >= 28


def test_block_multiplier_on_sd15_keys():
    f = block_multiplier("SD-OUTALL", "sd1")
    assert f("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q") == 0.0      # IN04
    assert f("unet.mid_block.attentions.0.proj_in") == 0.0
    assert f("unet.up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k") == 1.0        # OUT03
    assert f("text_encoder.text_model.encoder.layers.3.mlp.fc1") == 1.0                      # BASE
    f = block_multiplier([0.25] + [0.0] * 16, "sd2")
    assert f("text_encoder.text_model.encoder.layers.3.mlp.fc1") == 0.25
    assert f("unet.down_blocks.0.resnets.0.conv1") == 0.0            # IN01: position 1 of the 17 layout
    assert f("unet.down_blocks.0.downsamplers.0.conv") == 1.0        # IN03: not in the 17 layout -> 1
    assert f("unet.up_blocks.0.resnets.0.conv1") == 1.0              # OUT00: idem


def test_flux_blocks():
    v = [0.5] + [float(i) for i in range(19)] + [100.0 + i for i in range(38)]
    f = block_multiplier(v, "flux")
    assert f("transformer.transformer_blocks.7.attn.to_q") == 7.0
    assert f("transformer.single_transformer_blocks.37.proj_out") == 137.0
    assert f("diffusion_model.double_blocks.3.img_attn.proj") == 3.0
    assert f("transformer.x_embedder") == 0.5
    assert block_multiplier("FLUX-DOUBLE", "flux")("transformer.single_transformer_blocks.0.proj_mlp") == 0.0


def test_bad_vectors_are_clear_errors():
    with pytest.raises(InvalidParameterError, match="fits no layout"):
        block_multiplier("1,0,1", "sd1")
    with pytest.raises(InvalidParameterError, match="not a number"):
        block_multiplier("1,x,1", "sd1")
    with pytest.raises(InvalidParameterError, match="more than one"):
        block_multiplier([1.0] * 20, None)          # SDXL 20 or Flux 20
    assert block_multiplier([1.0] * 17, None)("unet.conv_in") == 1.0      # 17 is SD1 only


def test_strength_split():
    w, f = strength_multiplier(0.8, 0.8)
    assert (w, f) == (0.8, None)
    w, f = strength_multiplier(0.8, 0.2)
    assert w == 0.8 and f("unet.down_blocks.0.resnets.0.conv1") == 1.0
    assert abs(w * f("text_encoder_2.text_model.encoder.layers.0.mlp.fc1") - 0.2) < 1e-12
    w, f = strength_multiplier(0.0, 0.5)          # CLIP only
    assert w * f("unet.mid_block.attentions.0.proj_in") == 0.0
    assert w * f("text_encoder.text_model.encoder.layers.0.mlp.fc1") == 0.5
    w, f = strength_multiplier(2.0, 1.0, "SD-OUTALL", "sd1")
    assert w * f("unet.down_blocks.1.attentions.0.proj_in") == 0.0
    assert w * f("unet.up_blocks.3.attentions.2.proj_out") == 2.0
    assert w * f("text_encoder.text_model.encoder.layers.0.mlp.fc1") == 1.0


# ----------------------------------------------------------------------------------------------
# plumbing: CLI and nodes reach merge(multipliers=)
# ----------------------------------------------------------------------------------------------
import inspect  # noqa: E402

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from domerge_core import load_lora, merge  # noqa: E402

needs_multipliers = pytest.mark.skipif("multipliers" not in inspect.signature(merge).parameters,
                                       reason="merge(multipliers=) not in this engine yet")
MODS = {"lora_unet_down_blocks_1_attentions_0_proj_in": "unet.down_blocks.1.attentions.0.proj_in",      # IN04
        "lora_unet_up_blocks_1_attentions_0_proj_in": "unet.up_blocks.1.attentions.0.proj_in",          # OUT03
        "lora_te_text_model_encoder_layers_0_mlp_fc1": "text_encoder.text_model.encoder.layers.0.mlp.fc1"}


def _tiny(path, seed):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name in MODS:
        sd[name + ".lora_down.weight"] = torch.randn(2, 12, generator=g, dtype=torch.float64)
        sd[name + ".lora_up.weight"] = torch.randn(10, 2, generator=g, dtype=torch.float64)
    save_file(sd, str(path), metadata={"ss_base_model_version": "sd_v1"})
    lo = load_lora(str(path))
    return {k: lo[k].delta(torch.float64) for k in MODS.values()}


@needs_multipliers
def test_cli_block_and_clip_weights(tmp_path):
    from domerge_core.cli import main

    da, db = _tiny(tmp_path / "a.safetensors", 1), _tiny(tmp_path / "b.safetensors", 2)
    out = tmp_path / "out.safetensors"
    rc = main(["merge", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"), "-o", str(out),
               "--method", "ta", "--weights", "0.5,1", "--clip-weights", "0.2,0.3", "--block-weights", "SD-OUTALL",
               "--block-weights", "-", "--compute-dtype", "fp64", "--dtype", "fp32", "-q"])
    assert rc == 0
    got = load_lora(str(out))
    want = {"unet.down_blocks.1.attentions.0.proj_in": lambda k: 0.0 * da[k] + 1.0 * db[k],
            "unet.up_blocks.1.attentions.0.proj_in": lambda k: 0.5 * da[k] + 1.0 * db[k],
            "text_encoder.text_model.encoder.layers.0.mlp.fc1": lambda k: 0.2 * da[k] + 0.3 * db[k]}
    for k, f in want.items():
        w = f(k)
        assert float((got[k].delta(torch.float64) - w).norm() / w.norm()) < 1e-6, k


def test_cli_block_weights_errors(tmp_path, capsys):
    from domerge_core.cli import main

    _tiny(tmp_path / "a.safetensors", 1)
    rc = main(["merge", str(tmp_path / "a.safetensors"), "-o", str(tmp_path / "o.safetensors"),
               "--block-weights", "1,2,x"])
    assert rc == 2 and "--block-weights" in capsys.readouterr().err
    rc = main(["merge", str(tmp_path / "a.safetensors"), "-o", str(tmp_path / "o.safetensors"),
               "--block-weights", "1,0,1"])
    err = capsys.readouterr().err
    assert rc == 2 and "fits no layout" in err and "\n" == err[-1] and err.count("\n") == 1
    assert not (tmp_path / "o.safetensors").exists()


@needs_multipliers
def test_node_clip_strength_equals_stock_loraloader_strength_clip(tmp_path):
    """LoRA list with strength 0.7 / strength_clip 0.3 -> 'ta' at full rank -> applied at 1/1 patches
    what stock LoraLoader(0.7, 0.3) patches; a block-weight vector zeroes the IN blocks."""
    from comfy_support import library
    import domerge_nodes
    import folder_paths
    import nodes as comfy_nodes

    dirs = library.setup_folders(tmp_path)
    library.tiny_loras(dirs["loras"])
    folder_paths.filename_list_cache.clear()
    model, clip, _ = library.load_checkpoint()
    lst = domerge_nodes.NODE_CLASS_MAPPINGS["DomergeLoraList"]()
    (loras,) = lst.build("tiny_kohya_a.safetensors", 0.7, strength_clip=0.3, use_strength_clip=True)
    node = domerge_nodes.NODE_CLASS_MAPPINGS["DomergeMergeLoras"]()
    widgets = {k: v[1]["default"] for k, v in node.INPUT_TYPES()["required"].items()
               if k not in ("loras", "method") and isinstance(v[1], dict) and "default" in v[1]}
    merged, text = node.merge(loras, "ta", model=model, clip=clip, **widgets)
    assert "text encoder at weight 0.3" in text
    m1, c1 = domerge_nodes.NODE_CLASS_MAPPINGS["DomergeApplyLora"]().apply(model, clip, merged, 1.0, 1.0)
    m2, c2 = comfy_nodes.LoraLoader().load_lora(model, clip, "tiny_kohya_a.safetensors", 0.7, 0.3)
    for p1, p2, base in ((m1, m2, model), (c1.patcher, c2.patcher, clip.patcher)):
        assert set(p1.patches) == set(p2.patches)
        for key in list(p2.patches)[:20]:
            b = library.patched_weight(base, key)
            d1, d2 = library.patched_weight(p1, key) - b, library.patched_weight(p2, key) - b
            assert float((d1 - d2).norm() / d2.norm()) < 1e-4, key


def test_panel_block_weights_reach_merge_kwargs(tmp_path):
    import domerge_widgets

    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    _tiny(a, 1), _tiny(b, 2)
    p = domerge_widgets.MergePanel(loras=[str(a), str(b)])
    assert "multipliers" not in p.merge_kwargs()
    p.rows[0].blocks.value = "SD-OUTALL"
    kw = p.merge_kwargs()
    f = kw["multipliers"][0]
    assert kw["multipliers"][1] is None
    assert f("unet.down_blocks.1.attentions.0.proj_in") == 0.0 and f("unet.up_blocks.1.attentions.0.proj_in") == 1.0
    assert p.is_stale
    p.rows[0].blocks.value = "1,2"                     # fits no layout: the panel says so, no exception
    assert p.is_stale


# The Inspire pack's resources/lbw-preset.txt (ltdrdata/ComfyUI-Inspire-Pack), its Flux lines verbatim.
INSPIRE_FLUX_PRESETS = """\
FLUX-DBL-FRONT:1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0
FLUX-DBL-MID:0,0,0,0,0,0,1,1,1,1,1,1,0,0,0,0,0,0
FLUX-DBL-TAIL:0,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1,1
"""


def _inspire_lbw(vector, blocks):
    """The Inspire loader's positional rule (LoraLoaderBlockWeight.load_lbw) for plain numbers: entry 0
    is every key outside the blocks; each next block present (double blocks by number, then single
    blocks) takes the next entry, and once the vector is used up the last ratio carries on."""
    out, i, ratio, last = {}, 1, 1.0, None
    for kind, n in blocks:
        if n != last and len(vector) > i:
            ratio = vector[i]
            i += 1
        last = n
        out[(kind, n)] = ratio
    return out


@pytest.mark.parametrize("line", INSPIRE_FLUX_PRESETS.splitlines())
def test_inspire_flux_presets_weigh_each_block_as_the_inspire_loader_does(line):
    """A Flux LoRA over all 19 double and 38 single blocks: each preset (and its quoted 18 values)
    gives every block the factor the Inspire loader's positional rule gives it."""
    name, values = line.split(":")
    vec = [float(x) for x in values.split(",")]
    assert len(vec) == 18 and PRESETS[name] == values
    blocks = [("D", n) for n in range(19)] + [("S", n) for n in range(38)]
    want = _inspire_lbw(vec, blocks)
    for spec in (name, values, vec):
        f = block_multiplier(spec, "flux")
        for (kind, n), w in want.items():
            key = (f"transformer.transformer_blocks.{n}.attn.to_q" if kind == "D"
                   else f"transformer.single_transformer_blocks.{n}.proj_mlp")
            assert f(key) == w, (name, kind, n)
        assert f("transformer.x_embedder") == vec[0]
    # TAIL reaches D17, D18 and every single block with its last value (1); FRONT/MID leave them at 0
    assert want[("S", 37)] == (1.0 if name.endswith("TAIL") else 0.0)


def test_flux_20_values_carry_the_last_value_to_the_single_blocks_as_inspire_does():
    vec = [0.5] + [float(i) for i in range(19)]
    f = block_multiplier(vec, "flux")
    want = _inspire_lbw(vec, [("D", n) for n in range(19)] + [("S", n) for n in range(38)])
    assert f("transformer.single_transformer_blocks.5.proj_out") == want[("S", 5)] == 18.0
    assert f("diffusion_model.double_blocks.18.img_attn.proj") == 18.0
    assert block_multiplier([1.0] * 18, None)("transformer.single_transformer_blocks.0.proj_out") == 1.0  # Flux only
